"""Prompt interop (support/prompt_formats.py): a promot prompt exported as a PEFT prompt-tuning
adapter gives, under the real `peft` package (the test-only oracle), the logits promot gives
with the same prompt; an adapter PEFT saved itself is imported back; T5X's .npy round-trips."""

import json

import numpy
import pytest
import torch
from helpers import load_oracle, make_checkpoint, random_batch

import model
from support import prompt_formats
from support.errors import BadInput, DamagedFile

peft = pytest.importorskip("peft")


def assert_logits_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def promot_logits(model_dir, ids, mask, dec, prompt):
    with torch.no_grad():
        return model.load_pretrained(model_dir).eval()(ids, mask, dec, prompt=prompt)


def peft_logits(model_dir, adapter_dir, ids, mask, dec):
    net = peft.PeftModel.from_pretrained(load_oracle(model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return net(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


@pytest.mark.parametrize("kind", ["t5v1_1", "mt5"])
def test_peft_loads_the_exported_prompt_and_gives_promots_logits(tmp_path, kind):
    config = make_checkpoint(tmp_path / "model", kind=kind)
    prompt = torch.randn(5, config["d_model"])
    prompt_formats.write_peft_adapter(tmp_path / "adapter", prompt, tmp_path / "model")
    ids, mask, dec = random_batch(config["vocab_size"])  # padded rows: the mask is extended too
    assert_logits_close(
        promot_logits(tmp_path / "model", ids, mask, dec, prompt),
        peft_logits(tmp_path / "model", tmp_path / "adapter", ids, mask, dec),
    )


def test_the_adapter_config_is_a_seq2seq_prompt_tuning_config_for_peft(tmp_path):
    config = make_checkpoint(tmp_path / "model")
    prompt_formats.write_peft_adapter(
        tmp_path / "adapter", torch.randn(7, config["d_model"]), tmp_path / "model"
    )
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded, peft.PromptTuningConfig)
    assert (loaded.peft_type, loaded.task_type) == (
        peft.PeftType.PROMPT_TUNING,
        peft.TaskType.SEQ_2_SEQ_LM,
    )
    assert (loaded.num_virtual_tokens, loaded.token_dim, loaded.num_transformer_submodules) == (
        7,
        32,
        1,
    )
    assert (loaded.num_layers, loaded.num_attention_heads) == (
        config["num_layers"],
        config["num_heads"],
    )
    assert loaded.base_model_name_or_path == str(tmp_path / "model")
    from safetensors.torch import load_file

    assert list(load_file(tmp_path / "adapter/adapter_model.safetensors")) == ["prompt_embeddings"]


def test_an_adapter_peft_saved_is_imported_with_the_rows_peft_prepends(tmp_path):
    # PEFT's default for seq2seq is num_transformer_submodules = 2: a 2p-row table of which
    # prompt tuning prepends the first p rows to the encoder.
    config = make_checkpoint(tmp_path / "model")
    net = peft.get_peft_model(
        load_oracle(tmp_path / "model"),
        peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
    )
    assert net.peft_config["default"].num_transformer_submodules == 2
    with torch.no_grad():
        net.prompt_encoder["default"].embedding.weight.normal_()
    net.save_pretrained(tmp_path / "adapter")
    prompt = prompt_formats.read_peft_adapter(tmp_path / "adapter", d_model=config["d_model"])
    assert torch.equal(prompt, net.prompt_encoder["default"].embedding.weight[:4].detach())
    ids, mask, dec = random_batch(config["vocab_size"])
    assert_logits_close(
        promot_logits(tmp_path / "model", ids, mask, dec, prompt),
        peft_logits(tmp_path / "model", tmp_path / "adapter", ids, mask, dec),
    )


def test_round_trip_through_the_command_line_into_a_promot_prompt_file(tmp_path):
    config = make_checkpoint(tmp_path / "model")
    prompts = {"rte": torch.randn(3, config["d_model"]), "snli": torch.randn(3, config["d_model"])}
    prompt_formats.save_prompts(prompts, tmp_path / "prompt.safetensors")
    assert (
        prompt_formats.main(
            [
                "export",
                str(tmp_path / "prompt.safetensors"),
                "--task",
                "snli",
                "--peft",
                str(tmp_path / "adapter"),
                "--base",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    assert (
        prompt_formats.main(
            [
                "import",
                str(tmp_path / "adapter"),
                "--to",
                str(tmp_path / "back.safetensors"),
                "--task",
                "snli",
                "--base",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    back = prompt_formats.read_prompts(str(tmp_path / "back.safetensors"), config["d_model"])
    assert list(back) == ["snli"] and torch.equal(back["snli"], prompts["snli"])


def test_t5x_npy_is_written_as_float32_p_by_d_and_read_back(tmp_path):
    prompt = torch.randn(6, 32, dtype=torch.bfloat16)
    prompt_formats.write_t5x_npy(tmp_path / "prompt.npy", prompt)
    array = numpy.load(tmp_path / "prompt.npy", allow_pickle=False)
    assert array.shape == (6, 32) and array.dtype == numpy.float32
    assert torch.equal(
        prompt_formats.read_t5x_npy(tmp_path / "prompt.npy", d_model=32), prompt.float()
    )
    assert torch.equal(
        prompt_formats.read_prompts(str(tmp_path / "prompt.npy"), 32, tasks="rte")["rte"],
        prompt.float(),
    )


def test_npy_export_and_import_on_the_command_line(tmp_path):
    prompt = torch.randn(4, 32)
    prompt_formats.save_prompts({"rte": prompt}, tmp_path / "prompt.safetensors")
    assert (
        prompt_formats.main(
            ["export", str(tmp_path / "prompt.safetensors"), "--npy", str(tmp_path / "p.npy")]
        )
        == 0
    )
    assert (
        prompt_formats.main(
            [
                "import",
                str(tmp_path / "p.npy"),
                "--to",
                str(tmp_path / "q.safetensors"),
                "--task",
                "rte",
            ]
        )
        == 0
    )
    assert torch.equal(prompt_formats.read_prompts(str(tmp_path / "q.safetensors"))["rte"], prompt)


# --- promot's prompt file: what promot.py writes and evaluate.py reads ------------------------


def test_prompts_round_trip_through_their_file(tmp_path):
    from safetensors import safe_open

    prompts = {"rte": torch.rand(5, 8), "wmt14_enfr": torch.rand(5, 8)}
    prompt_formats.save_prompts(prompts, tmp_path / "p.safetensors")
    with safe_open(tmp_path / "p.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["prompt.rte", "prompt.wmt14_enfr"] and f.metadata() == {
            "tasks": "rte,wmt14_enfr"
        }
    back = prompt_formats.read_prompts(tmp_path / "p.safetensors", d_model=8, length=5)
    assert list(back) == ["rte", "wmt14_enfr"] and all(
        torch.equal(back[t], prompts[t]) for t in prompts
    )


def test_a_single_task_file_also_holds_prompt_for_other_tasks(tmp_path):
    prompt = torch.rand(4, 8, dtype=torch.float64)
    prompt_formats.save_prompts({"rte": prompt}, tmp_path / "p.safetensors")
    back = prompt_formats.read_prompts(tmp_path / "p.safetensors", 8, tasks=["rte", "cb"])
    assert back["rte"].dtype == torch.float32 and torch.equal(back["rte"], prompt.float())
    assert torch.equal(back["cb"], back["rte"])  # no 'prompt.cb' key: the file's 'prompt'


def test_t5x_npy_prompt_is_read_for_the_named_tasks(tmp_path):
    import numpy

    numpy.save(tmp_path / "p.npy", numpy.arange(24, dtype=numpy.float32).reshape(3, 8))
    prompts = prompt_formats.read_prompts(str(tmp_path / "p.npy"), d_model=8, tasks=["rte"])
    assert list(prompts) == ["rte"] and torch.equal(prompts["rte"], torch.arange(24.0).view(3, 8))
    with pytest.raises(BadInput, match=r"p.npy: the file does not say which task .*; pass --task"):
        prompt_formats.read_prompts(str(tmp_path / "p.npy"), d_model=8)


def test_prompt_file_without_task_keys_needs_the_task(tmp_path):
    from safetensors.torch import save_file

    save_file({"prompt": torch.rand(3, 8)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(
        BadInput,
        match=r"p.safetensors: the file does not say which task .*pass --task",
    ):
        prompt_formats.read_prompts(tmp_path / "p.safetensors", d_model=8)


def test_prompt_of_the_wrong_width_or_length_names_file_key_and_shapes(tmp_path):
    prompt_formats.save_prompts({"rte": torch.zeros(5, 16)}, tmp_path / "narrow.safetensors")
    with pytest.raises(
        BadInput,
        match=r"narrow.safetensors: prompt 'prompt.rte' has shape \(5, 16\); "
        r"the model needs \(p, 32\) \(d_model = 32\)",
    ):
        prompt_formats.read_prompts(tmp_path / "narrow.safetensors", d_model=32)
    with pytest.raises(
        BadInput,
        match=r"narrow.safetensors: prompt 'prompt.rte' has length 5; "
        r"--prompt-length is 4",
    ):
        prompt_formats.read_prompts(tmp_path / "narrow.safetensors", d_model=16, length=4)


def test_missing_unreadable_and_pickled_prompt_files(tmp_path):
    import numpy

    with pytest.raises(BadInput, match="nope.safetensors: no such prompt file"):
        prompt_formats.read_prompts(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedFile, match="bad.safetensors: cannot read a prompt"):
        prompt_formats.read_prompts(tmp_path / "bad.safetensors")
    numpy.save(tmp_path / "obj.npy", numpy.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DamagedFile, match="obj.npy: cannot read a prompt"):
        prompt_formats.read_prompts(str(tmp_path / "obj.npy"), tasks=["rte"])


# --- Bad input: one line each, nothing written ---------------------------------------------


def test_another_peft_type_is_refused_in_one_line(tmp_path):
    make_checkpoint(tmp_path / "model")
    net = peft.get_peft_model(
        load_oracle(tmp_path / "model"),
        peft.LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"]),
    )
    net.save_pretrained(tmp_path / "lora")
    with pytest.raises(
        BadInput, match=r"adapter_config.json: peft_type is 'LORA'; only a PROMPT_TUNING"
    ) as err:
        prompt_formats.read_peft_adapter(tmp_path / "lora")
    assert "\n" not in str(err.value)


def test_a_width_that_does_not_match_the_model_is_refused(tmp_path):
    prompt_formats.write_peft_adapter(tmp_path / "adapter", torch.randn(3, 32), "google/mt5-small")
    with pytest.raises(BadInput, match=r"the prompt is 32 wide, but the model's d_model is 512"):
        prompt_formats.read_peft_adapter(tmp_path / "adapter", d_model=512)
    with pytest.raises(BadInput, match=r"the prompt is 32 wide, but the model's d_model is 512"):
        prompt_formats.read_t5x_npy(_npy(tmp_path, torch.randn(3, 32)), d_model=512)


def test_an_export_to_a_model_of_another_width_writes_nothing(tmp_path):
    make_checkpoint(tmp_path / "model")  # d_model 32
    with pytest.raises(
        BadInput,
        match=r"model/config.json: the prompt is 48 wide, but the model's d_model is 32",
    ):
        prompt_formats.write_peft_adapter(
            tmp_path / "adapter", torch.randn(3, 48), tmp_path / "model"
        )
    assert not (tmp_path / "adapter").exists()


def test_an_export_that_fails_halfway_leaves_nothing_and_keeps_the_old_adapter(
    tmp_path, monkeypatch
):
    old = torch.randn(3, 32)
    prompt_formats.write_peft_adapter(tmp_path / "adapter", old, "google/t5-v1_1-small")
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(
        safetensors.torch, "save_file", fail
    )  # after adapter_config.json is written
    with pytest.raises(OSError, match="disk full"):
        prompt_formats.write_peft_adapter(
            tmp_path / "adapter", torch.randn(3, 32), "google/t5-v1_1-small"
        )
    with pytest.raises(OSError, match="disk full"):
        prompt_formats.write_peft_adapter(
            tmp_path / "new", torch.randn(3, 32), "google/t5-v1_1-small"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter"
    ]  # no half-written folder, no temp
    assert torch.equal(prompt_formats.read_peft_adapter(tmp_path / "adapter"), old)


def test_an_export_into_a_folder_holding_other_files_is_refused(tmp_path):
    make_checkpoint(tmp_path / "best")  # e.g. a run's best/: the model must survive
    with pytest.raises(
        BadInput,
        match=r"best: holds config.json, model.safetensors, not only a PEFT adapter",
    ):
        prompt_formats.write_peft_adapter(tmp_path / "best", torch.randn(3, 32), tmp_path / "best")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_a_folder_without_adapter_config_is_named(tmp_path):
    with pytest.raises(BadInput, match=r"no adapter_config.json; not a PEFT adapter folder"):
        prompt_formats.read_peft_adapter(tmp_path)


def test_a_prompt_that_is_not_2d_is_refused(tmp_path):
    with pytest.raises(BadInput, match=r"a prompt is a \(p, d_model\) tensor, got \(2, 3, 4\)"):
        prompt_formats.write_t5x_npy(tmp_path / "p.npy", torch.zeros(2, 3, 4))
    assert list(tmp_path.iterdir()) == []


def test_command_line_errors_are_one_line(tmp_path, capsys):
    prompt_formats.save_prompts(
        {"rte": torch.randn(2, 32), "cb": torch.randn(2, 32)}, tmp_path / "prompt.safetensors"
    )
    assert (
        prompt_formats.main(
            ["export", str(tmp_path / "prompt.safetensors"), "--npy", str(tmp_path / "p.npy")]
        )
        == 1
    )
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'prompt.safetensors'}: holds the prompts of cb, rte; pass --task\n"
    )
    assert (
        prompt_formats.main(
            [
                "export",
                str(tmp_path / "prompt.safetensors"),
                "--task",
                "rte",
                "--peft",
                str(tmp_path / "a"),
            ]
        )
        == 1
    )
    assert (
        capsys.readouterr().err
        == "error: --peft needs --base, the model the prompt was trained with\n"
    )
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg/adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    assert (
        prompt_formats.main(
            ["import", str(tmp_path / "cfg"), "--to", str(tmp_path / "x"), "--task", "t"]
        )
        == 1
    )
    assert capsys.readouterr().err.count("\n") == 1


def _npy(tmp_path, prompt):
    numpy.save(tmp_path / "p.npy", prompt.numpy())
    return tmp_path / "p.npy"
