"""LoRA adapters (paper App. C.7): zero at start, exact math, removable, saved on their own."""

import pytest
import torch
from helpers import make_checkpoint, random_batch

import model
from support import lora as lora_lib
from support.errors import BadInput


@pytest.fixture
def net(tmp_path):
    make_checkpoint(tmp_path / "ckpt", kind="mt5")
    return model.load_pretrained(tmp_path / "ckpt").eval()


def logits(net, batch):
    with torch.no_grad():
        return net(*batch)


def randomize_b(net):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".lora.q.b") or name.endswith(".lora.v.b"):
                p.normal_()


def test_fresh_adapter_leaves_logits_unchanged(net):
    batch = random_batch(net.config.vocab_size)
    before = logits(net, batch)
    params = lora_lib.add_lora(net, rank=4)
    assert torch.equal(logits(net, batch), before)
    attentions = 2 + 2 * 2  # mt5 fixture: 2 encoder self, 2 decoder self + 2 cross
    assert len(params) == attentions * 2 * 2  # (q, v) x (A, B)


def test_adapter_equals_dense_weight_plus_scaled_BA(net):
    lora_lib.add_lora(net, rank=2, alpha=6.0, targets=("q", "v"))
    randomize_b(net)
    attn = net.encoder.blocks[1].self_attn
    x = torch.randn(3, 5, net.config.d_model)
    for name in ("q", "v"):
        a, b = attn.lora[name].a, attn.lora[name].b
        dense = getattr(attn, name).weight + (6.0 / 2) * b @ a
        torch.testing.assert_close(getattr(attn, name)(x), x @ dense.T)
    assert "k" not in attn.lora and not attn.k._forward_hooks  # untargeted projections untouched
    assert torch.equal(attn.k(x), torch.nn.functional.linear(x, attn.k.weight))


def test_adapter_parameter_names_are_unchanged(net):
    """Saved adapter files and run checkpoints name the tensors this way."""
    lora_lib.add_lora(net, rank=2)
    names = [n for n, _ in net.named_parameters() if ".lora." in n]
    assert names[:2] == [
        "encoder.blocks.0.self_attn.lora.q.a",
        "encoder.blocks.0.self_attn.lora.q.b",
    ]
    assert "decoder.blocks.1.cross_attn.lora.v.b" in names
    assert len(names) == 6 * 2 * 2  # 6 attention layers x (q, v) x (A, B)


def test_adding_adapters_again_replaces_them(net):
    lora_lib.add_lora(net, rank=2)
    lora_lib.add_lora(net, rank=4, alpha=8.0)
    randomize_b(net)
    attn = net.decoder.blocks[0].cross_attn
    assert len(attn.q._forward_hooks) == 1  # one hook per projection, reading the current adapter
    x = torch.randn(2, 3, net.config.d_model)
    dense = attn.q.weight + (8.0 / 4) * attn.lora["q"].b @ attn.lora["q"].a
    torch.testing.assert_close(attn.q(x), x @ dense.T)
    assert lora_lib.lora_info(net) == {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]}


def test_adapters_attach_to_any_module_with_q_k_v_o_linears():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(4, 4, bias=False) for _ in range(4))
            self.other = torch.nn.Linear(4, 4)

    toy = torch.nn.Sequential(Toy(), torch.nn.Linear(4, 4))
    params = lora_lib.add_lora(toy, rank=1, targets=("o",))
    assert [n for n, _ in toy.named_parameters() if ".lora." in n] == ["0.lora.o.a", "0.lora.o.b"]
    assert len(params) == 2


def test_disabling_adapters_restores_the_plain_model(net):
    batch = random_batch(net.config.vocab_size)
    plain = logits(net, batch)
    lora_lib.add_lora(net, rank=4)
    randomize_b(net)
    assert not torch.allclose(logits(net, batch), plain)
    lora_lib.set_lora_enabled(net, False)
    assert torch.equal(logits(net, batch), plain)
    lora_lib.set_lora_enabled(net, True)
    assert not torch.allclose(logits(net, batch), plain)


def test_save_and_load_round_trip(net, tmp_path):
    lora_lib.add_lora(net, rank=3, alpha=5.0, targets=("q", "k", "v", "o"))
    randomize_b(net)
    lora_lib.save_lora(net, tmp_path / "lora.safetensors")
    fresh = model.load_pretrained(tmp_path / "ckpt").eval()
    lora_lib.load_lora(fresh, tmp_path / "lora.safetensors")
    assert lora_lib.lora_info(fresh) == {"rank": 3, "alpha": 5.0, "targets": ["q", "k", "v", "o"]}
    batch = random_batch(net.config.vocab_size)
    assert torch.equal(logits(fresh, batch), logits(net, batch))


def test_model_checkpoint_excludes_adapters(net, tmp_path):
    lora_lib.add_lora(net, rank=2)
    model.save_pretrained(net, tmp_path / "saved")
    reloaded = model.load_pretrained(tmp_path / "saved")  # would fail on unexpected adapter tensors
    assert lora_lib.lora_info(reloaded) is None


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_bad_rank(net, rank):
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        lora_lib.add_lora(net, rank=rank)


def test_unknown_target(net):
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['wi'\]"):
        lora_lib.add_lora(net, rank=2, targets=("q", "wi"))


def test_adapter_for_another_rank_is_rejected(net, tmp_path):
    lora_lib.add_lora(net, rank=2)
    lora_lib.save_lora(net, tmp_path / "r2.safetensors")
    other = model.load_pretrained(tmp_path / "ckpt")
    lora_lib.add_lora(other, rank=4)
    with pytest.raises(
        BadInput, match=r"r2.safetensors \(rank 2 in the file\): .* has shape \(2, 32\)"
    ):
        lora_lib.load_lora(other, tmp_path / "r2.safetensors")


def test_adapter_for_another_model_shape_is_rejected(net, tmp_path):
    lora_lib.add_lora(net, rank=2)
    lora_lib.save_lora(net, tmp_path / "a.safetensors")
    make_checkpoint(tmp_path / "wide", kind="mt5", d_model=48)
    with pytest.raises(BadInput, match="adapter made for d_model=32, this model has d_model=48"):
        lora_lib.load_lora(model.load_pretrained(tmp_path / "wide"), tmp_path / "a.safetensors")
    make_checkpoint(tmp_path / "deep", kind="mt5", num_layers=3)
    with pytest.raises(BadInput, match="do not fit this model"):
        lora_lib.load_lora(model.load_pretrained(tmp_path / "deep"), tmp_path / "a.safetensors")


# --- the two ProMoT stages with LoRA as the stage-1 module (promot.py) -------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import promot_fixtures as pf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import promot

    d = tmp_path_factory.mktemp("lora_runs")
    spiece = pf.make_spiece(str(d / "spm"))
    env = dict(
        model=pf.make_model_dir(str(d / "model"), spiece),
        data=pf.make_data_dir(str(d / "data")),
        root=d,
    )
    common = [
        "--model",
        env["model"],
        "--data-dir",
        env["data"],
        "--task",
        "toy_tf",
        "--out",
        str(d / "run"),
        "--stage1-module",
        "lora",
        "--lora-rank",
        "2",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--save-every",
        "3",
        "--no-eval",
        "--log-every",
        "1",
    ]
    env["stage1"] = promot.train(promot.parse_args(["--stage", "1", *common]))
    env["adapters_after_stage1"] = load_file(
        str(d / "run" / "stage1" / "final" / "lora.safetensors")
    )
    env["stage2"] = promot.train(promot.parse_args(["--stage", "2", *common]))
    return env


def test_stage1_with_lora_changes_only_the_adapters(runs):
    pre = model.load_pretrained(runs["model"]).state_dict()
    after = runs["stage1"].model.state_dict()
    assert sorted(n for n in after if ".lora." not in n) == sorted(pre)
    assert all(torch.equal(after[n], pre[n]) for n in pre)  # every model tensor bit-identical
    b = [t for n, t in runs["adapters_after_stage1"].items() if n.endswith(".b")]
    assert b and all(t.abs().sum() > 0 for t in b)  # the adapters learned (B started at zero)


def test_stage2_keeps_the_adapters_bit_identical_and_applied(runs):
    net = runs["stage2"].model
    for name, tensor in runs["adapters_after_stage1"].items():
        assert torch.equal(net.get_parameter(name).detach(), tensor), name
    assert lora_lib.lora_info(net)["rank"] == 2
    assert all(m.enabled for m in net.modules() if isinstance(m, lora_lib.LoRA))
    pre = model.load_pretrained(runs["model"]).state_dict()
    assert not torch.equal(
        net.state_dict()["decoder.blocks.0.ff.wo.weight"], pre["decoder.blocks.0.ff.wo.weight"]
    )
    saved = load_file(str(runs["root"] / "run" / "stage2" / "final" / "lora.safetensors"))
    assert all(torch.equal(saved[n], t) for n, t in runs["adapters_after_stage1"].items())


def test_removing_the_adapters_restores_the_plain_stage2_model(runs):
    final = str(runs["root"] / "run" / "stage2" / "final")
    plain = model.load_pretrained(final).eval()  # the saved model holds no adapters
    adapted = lora_lib.load_lora(
        model.load_pretrained(final).eval(), os.path.join(final, "lora.safetensors")
    )
    batch = random_batch(plain.config.vocab_size)
    with torch.no_grad():
        assert not torch.allclose(adapted(*batch), plain(*batch))
        lora_lib.set_lora_enabled(adapted, False)
        assert torch.equal(adapted(*batch), plain(*batch))


def test_evaluate_applies_adapters_only_for_the_fine_tuned_format(runs, tmp_path):
    final = str(runs["root"] / "run" / "stage2" / "final")
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "evaluate.py"),
        "--model",
        final,
        "--data-dir",
        runs["data"],
        "--lora",
        os.path.join(final, "lora.safetensors"),
        "--task",
        "toy_tf",
        "--eval-tasks",
        "toy_copy",
        "--shots",
        "0",
        "--eval-examples",
        "3",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    import json

    runs_ = {r["task"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs_["toy_tf"]["lora"] is True and runs_["toy_copy"]["lora"] is False


def test_stage1_lora_under_torchrun_equals_one_process(runs):
    common = [
        "promot.py",
        "--stage",
        "1",
        "--stage1-module",
        "lora",
        "--lora-rank",
        "2",
        "--model",
        runs["model"],
        "--data-dir",
        runs["data"],
        "--task",
        "toy_tf",
        "--steps",
        "2",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--dropout",
        "0",
        "--no-eval",
    ]
    one, two = runs["root"] / "t_one", runs["root"] / "t_two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, *common, "--out", str(one)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env=env,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            *common,
            "--out",
            str(two),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(one / "stage1" / "final" / "lora.safetensors"))
    b = load_file(str(two / "stage1" / "final" / "lora.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_stage2_lora_without_stage1_adapters_is_refused(runs, tmp_path, capsys):
    import promot

    code = promot.main(
        [
            "--stage",
            "2",
            "--stage1-module",
            "lora",
            "--model",
            runs["model"],
            "--data-dir",
            runs["data"],
            "--task",
            "toy_tf",
            "--out",
            str(tmp_path / "new"),
        ]
    )
    assert code == 2
    assert "needs stage-1 adapters: none at" in capsys.readouterr().err


def test_lora_rank_zero_and_unknown_targets_are_refused(runs, tmp_path, capsys):
    import promot

    base = [
        "--stage",
        "1",
        "--stage1-module",
        "lora",
        "--model",
        runs["model"],
        "--data-dir",
        runs["data"],
        "--task",
        "toy_tf",
        "--out",
        str(tmp_path / "x"),
    ]
    assert promot.main([*base, "--lora-rank", "0"]) == 2
    assert "--lora-rank 0: expected >= 1" in capsys.readouterr().err
