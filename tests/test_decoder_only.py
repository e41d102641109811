"""ProMoT on a decoder-only checkpoint (the paper's App. C.6): promot.py and evaluate.py on a
tiny random Llama written by transformers, with a Llama-style tokenizer.model.

The oracles: transformers' AutoTokenizer for the sequences data.py builds, LlamaForCausalLM
given `inputs_embeds=[P; embed(x)]` for the training loss, transformers for the exported model
and peft for the exported prompt-tuning adapter; one process for two ranks under torchrun.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import causal_lm
import data
import promot
import promot_fixtures as pf
from support import t5x_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoder_only")
    return dict(
        model=pf.make_llama_dir(str(d / "llama")), data=pf.make_data_dir(str(d / "data")), root=d
    )


def train_args(env, out, stage, *extra, steps=4, save_every=2):
    return [
        "--stage",
        stage,
        "--model",
        env["model"],
        "--data-dir",
        env["data"],
        "--task",
        "toy_tf",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
        "--batch-size",
        "8",
        "--prompt-length",
        "6",
        "--eval-examples",
        "4",
        "--num-beams",
        "2",
        *extra,
    ]


def test_a_decoder_batch_is_input_then_target_then_eos_left_padded(env):
    """No sentinels: each row is the tokenizer's ids of `input + " " + target`, then EOS, as
    AutoTokenizer gives them; labels are -100 on the input and the pads; rows end together."""
    from transformers import AutoTokenizer

    oracle = AutoTokenizer.from_pretrained(env["model"])
    tokenizer = data.load_tokenizer(env["model"])
    pairs = [("the cat sat on the mat answer:", "True"), ("dog answer:", "False")]
    batch = data.encode_batch(tokenizer, pairs)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for row, (x, y) in enumerate(pairs):
        want = oracle(f"{x} {y}")["input_ids"] + [oracle.eos_token_id]
        n = int(mask[row].sum())
        assert ids[row, -n:].tolist() == want and mask[row, :-n].sum() == 0  # left padding
        target = len(want) - len(oracle(x)["input_ids"])  # the answer's ids and EOS
        assert (labels[row, -target:] == ids[row, -target:]).all()
        assert (labels[row, :-target] == -100).all()


def test_the_training_loss_is_transformers_next_token_loss_on_the_target(env):
    """promot.forward + the T5X loss (no smoothing, no z-loss) over a left-padded batch with a
    prompt equals LlamaForCausalLM's summed loss on each row alone, given [P; embed(x)]."""
    from transformers import AutoModelForCausalLM

    tokenizer = data.load_tokenizer(env["model"])
    ours = causal_lm.load_pretrained(env["model"]).eval()
    theirs = AutoModelForCausalLM.from_pretrained(env["model"]).eval()
    pairs = [("the cat sat on the mat answer:", "True"), ("red dog answer:", "False big")]
    batch = data.encode_batch(tokenizer, pairs)
    prompt = torch.randn(3, ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, labels = promot.forward(ours, batch, prompt)
        total, _ = t5x_loss.cross_entropy(logits, labels, 0.0, 0.0)
        want = 0.0
        for row in range(len(pairs)):
            real = batch["attention_mask"][row].bool()
            ids, row_labels = batch["input_ids"][row, real][None], batch["labels"][row, real][None]
            embeds = torch.cat([prompt[None], theirs.get_input_embeddings()(ids)], dim=1)
            full = torch.cat([torch.full((1, 3), -100), row_labels], dim=1)
            out = theirs(inputs_embeds=embeds, labels=full)
            want += float(out.loss) * int((row_labels[:, 1:] != -100).sum())
    assert abs(float(total) - want) < 1e-4 * max(1.0, want)


def test_a_decoder_steps_tokens_count_each_real_token_once(env):
    """The progress line's tok/s: [P; input; target] per row, the target read once (a T5 adds
    its decoder's target tokens to the encoder's)."""
    from types import SimpleNamespace

    tokenizer = data.load_tokenizer(env["model"])
    model = causal_lm.load_pretrained(env["model"])
    batch = data.encode_batch(tokenizer, [("the cat sat answer:", "True"), ("dog answer:", "No")])
    batch["tasks"] = ["toy_tf", "toy_tf"]
    prompts = {"toy_tf": torch.zeros(3, model.config.hidden_size)}
    cfg = SimpleNamespace(prompt_length=3, label_smoothing=0.0, z_loss=0.0, dtype="float32")
    ctx = SimpleNamespace(world=1, device=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    _, tokens = promot.train_step(model, [batch], prompts, optimizer, cfg, ctx)
    assert tokens == int(batch["attention_mask"].sum()) + 2 * 3


def test_c6s_prompt_length_and_rate_are_the_decoder_only_defaults(env, tmp_path):
    """App. C.6: "prompt length 50" and prompt-tuning lr 0.3; stage 2 keeps B.4's 1e-3."""
    base = ["--model", env["model"], "--data-dir", env["data"], "--task", "toy_tf"]
    stage1 = promot.parse_args(["--stage", "1", *base, "--out", str(tmp_path / "a")])
    stage2 = promot.parse_args(["--stage", "2", *base, "--out", str(tmp_path / "a")])
    assert (stage1.prompt_length, stage1.lr, stage2.prompt_length, stage2.lr) == (50, 0.3, 50, 1e-3)
    t5 = pf.make_model_dir(str(tmp_path / "t5"), pf.make_spiece(str(tmp_path / "spiece")))
    base[1] = t5  # a T5 checkpoint keeps B.4's prompt length 100 and lr 0.2
    stage1 = promot.parse_args(["--stage", "1", *base, "--out", str(tmp_path / "a")])
    assert (stage1.prompt_length, stage1.lr) == (100, 0.2)


@pytest.fixture(scope="module")
def runs(env):
    out = env["root"] / "run"
    for stage in ("1", "2"):
        assert promot.main(train_args(env, out, stage)) == 0
    return out


def test_stage_1_exports_a_peft_adapter_that_gives_causal_lms_logits(env, runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = runs / "stage1" / "best" / "peft_toy_tf"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["task_type"], config["num_virtual_tokens"]) == ("CAUSAL_LM", 6)
    base = AutoModelForCausalLM.from_pretrained(env["model"]).eval()
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    prompt = load_file(str(runs / "stage1" / "best" / "prompt.safetensors"))["prompt.toy_tf"]
    ours = causal_lm.load_pretrained(env["model"]).eval()
    ids = torch.tensor([data.load_tokenizer(env["model"]).encode("the cat sat answer:")])
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, torch.ones_like(ids), prompt=prompt)
    assert got.shape == want.shape  # (1, p + L, V): PEFT's logits cover the virtual tokens too
    assert (got - want).abs().max() < 1e-4


def test_stage_2_exports_the_tuned_model_in_the_hugging_face_layout(env, runs):
    from transformers import AutoModelForCausalLM

    best = runs / "stage2" / "best"
    assert {"tokenizer.model", "tokenizer_config.json", "prompt.safetensors"} <= set(
        os.listdir(best)
    )
    tuned = load_file(str(best / "model.safetensors"))
    pretrained = load_file(os.path.join(env["model"], "model.safetensors"))
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)  # it trained
    theirs = AutoModelForCausalLM.from_pretrained(str(best)).eval()
    ours = causal_lm.load_pretrained(str(best)).eval()
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        diff = theirs(input_ids=ids).logits - ours(ids, torch.ones_like(ids))
    assert diff.abs().max() < 1e-4


def test_evaluate_scores_a_decoder_only_promot_checkpoint_with_its_prompt(env, runs, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["--model", str(runs / "stage2" / "best"), "--data-dir", env["data"]]
    argv += ["--eval-tasks", "toy_copy", "--out", str(out), "--eval-examples", "4"]
    import evaluate

    assert evaluate.main(argv + ["--num-beams", "2"]) == 0
    results = json.loads(out.read_text())
    prompted = {(r["task"], r["shots"]): r["prompt"] for r in results["runs"]}
    assert prompted[("toy_tf", 0)] and not prompted[("toy_copy", 1)]  # §4: same format only
    outputs = [e["raw_output"] for r in results["runs"] for e in r["examples"]]
    assert all("<extra_id" not in o for o in outputs)  # a decoder writes plain text
    one_shot = next(r for r in results["runs"] if r["shots"] == 1)["examples"][0]["input"]
    assert one_shot.count("\n\nQ: last word of") == 1  # PaLM's few-shot join: a blank line


def test_lora_in_the_prompts_place_runs_both_stages_on_a_decoder(env, tmp_path):
    """App. C.7 on a Llama: stage 1 trains only adapters on q_proj and v_proj (every model
    tensor stays as it was); stage 2's export is a plain checkpoint transformers loads, the
    adapters beside it in lora.safetensors."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    for stage in ("1", "2"):
        assert promot.main(train_args(env, out, stage, "--stage1-module", "lora")) == 0
    adapters = load_file(str(out / "stage1" / "best" / "lora.safetensors"))
    assert sorted({k.split(".lora.")[1] for k in adapters}) == ["q.a", "q.b", "v.a", "v.b"]
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith(".b"))  # trained
    best = out / "stage2" / "best"
    tuned = load_file(str(best / "model.safetensors"))
    assert not any(".lora." in k for k in tuned) and (best / "lora.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(str(best))  # loads: no stray tensor names


def test_two_ranks_train_a_decoder_like_one_process(env):
    """FSDP2 shards each decoder layer; stage 2 under torchrun ends with the one-process
    weights (to float32 rounding: the reduction order differs)."""
    root = env["root"]
    argv = train_args(env, root / "unused", "finetune", "--no-eval", steps=2, save_every=2)
    argv = argv[: argv.index("--out")] + argv[argv.index("--out") + 2 :]
    argv += ["--micro-batch-size", "4"]
    environ = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    run = dict(cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    one = subprocess.run([sys.executable, "promot.py", *argv, "--out", str(root / "one")], **run)
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*launcher, "--standalone", "promot.py", *argv, "--out", str(root / "two")], **run
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "returned a view tensor" not in two.stderr  # FSDP2's warning on a layer's outputs
    a = load_file(str(root / "one" / "finetune" / "final" / "model.safetensors"))
    b = load_file(str(root / "two" / "finetune" / "final" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("model_type", ["gemma", "gpt2", "mixtral"])
def test_an_unsupported_architecture_is_refused_in_one_line_naming_the_supported(
    env, tmp_path, capsys, model_type
):
    import shutil

    model = tmp_path / model_type
    shutil.copytree(env["model"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    argv = train_args(env, tmp_path / "out", "1")
    argv[argv.index("--model") + 1] = str(model)
    assert promot.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"model_type {model_type!r} is not supported" in err
    assert "llama, mistral, qwen2, qwen3" in err and not (tmp_path / "out").exists()


def test_a_decoder_checkpoint_without_a_tokenizer_file_is_one_line(env, tmp_path, capsys):
    import shutil

    model = tmp_path / "bare"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(env["model"], name), model / name)
    argv = train_args(env, tmp_path / "out", "1")
    argv[argv.index("--model") + 1] = str(model)
    assert promot.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tokenizer.json or tokenizer.model" in err


@pytest.mark.parametrize("damage", ["shape", "unexpected", "missing", "no weights"])
def test_a_damaged_decoder_checkpoint_is_refused_from_its_headers_before_the_run_folder(
    env, tmp_path, capsys, damage
):
    """As for a T5: every tensor by name and shape, read from the safetensors header, before
    promot.py writes RUN/ (the loader would find it only after)."""
    import shutil

    from safetensors.torch import save_file

    model = tmp_path / "damaged"
    shutil.copytree(env["model"], model)
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "shape":
        tensors[name] = tensors[name][:-1].clone()
    elif damage == "unexpected":
        tensors["model.layers.9.mlp.up_proj.weight"] = tensors[name].clone()
    elif damage == "missing":
        del tensors[name]
    save_file(tensors, model / "model.safetensors")
    if damage == "no weights":
        (model / "model.safetensors").unlink()
    argv = train_args(env, tmp_path / "out", "1")
    argv[argv.index("--model") + 1] = str(model)
    assert promot.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(model) in err and not (tmp_path / "out").exists()
    expected = {
        "shape": f"tensor {name!r} has shape",
        "unexpected": "unexpected tensor 'model.layers.9.mlp.up_proj.weight'",
        "missing": f"lack 1 tensor(s) config.json implies, e.g. [{name!r}]",
        "no weights": "model.safetensors: no such file",
    }[damage]
    assert expected in err


def test_the_bundled_decoder_miniature_loads_as_transformers_does():
    """lab/tiny-llama: at most 6 MB, a recipe with C.6's prompt settings, its tokenizer read
    as AutoTokenizer reads it, and causal_lm's logits equal to transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.join(ROOT, "lab", "tiny-llama")
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size <= 6 * 2**20
    recipe = json.load(open(os.path.join(folder, "recipe.json"), encoding="utf-8"))
    assert (recipe["every stage"]["prompt_length"], recipe["prompt"]["lr"]) == (50, 0.3)
    text = "Q: Does Anna have a red cat?\n\nQ: Where does Bo live? A:"
    ids = data.load_tokenizer(folder).encode(text)
    assert ids == AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    ids = torch.tensor([ids])
    ours = causal_lm.load_pretrained(folder).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (ours(ids, torch.ones_like(ids)) - theirs(input_ids=ids).logits).abs().max() < 1e-4
