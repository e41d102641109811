"""promot under `torchrun --nproc_per_node 2` (gloo, CPU) against one process.

Sharding must not change the result: the same global batch, the loss
normalised by the global token count, Adafactor statistics over whole
tensors. Reduction order differs (reduce-scatter vs one backward), so the
comparison is to float32 rounding, not bitwise.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import promot_fixtures as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*argv, nproc=2, code=0):
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        *argv,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == (code == 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_bad_input_under_torchrun_is_one_line_and_exit_2_on_every_rank(env, tmp_path):
    """torchrun itself raises ChildFailedError (its own traceback) whenever a rank exits
    non-zero; promot prints its line on rank 0 (unless torchrun stopped it first, when rank 1
    failed sooner), and torchrun's report names it (the error file) for each failed rank."""
    out = tmp_path / "out"
    argv = ["--stage", "1", "--model", env["model"], "--data-dir", env["data"], "--task", "toy_tf"]
    proc = torchrun("promot.py", *argv, "--out", str(out), "--lr", "-1", "--no-eval", code=2)
    line = "promot.py: error: --lr -1.0: expected a finite number >= 0"
    err = proc.stderr
    assert err.count(f"{line}\n") - err.count(f"traceback : {line}\n") <= 1, err  # not per rank
    assert "exitcode  : 2" in err and f"traceback : {line}" in err and not out.exists()


def test_sharded_adafactor_takes_the_single_process_steps(tmp_path):
    torchrun(os.path.join(ROOT, "tests", "dist_adafactor.py"), str(tmp_path / "ok"))
    assert (tmp_path / "ok").read_text() == "OK"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    spiece = pf.make_spiece(str(d / "spiece"))
    return dict(
        model=pf.make_model_dir(str(d / "model"), spiece),
        data=pf.make_data_dir(str(d / "data")),
        root=d,
    )


def test_two_ranks_end_with_the_weights_of_one_process(env):
    """Joint tuning trains both the FSDP-sharded model and the replicated prompt, here
    on a T5 v1.0 whose head is the embedding (tied, one FSDP unit, two gradient uses).
    One process accumulates two micro-batches of 2; two ranks take 2 rows each."""
    tied = pf.make_model_dir(
        str(env["root"] / "tied"), os.path.join(env["model"], "spiece.model"), kind="t5"
    )
    common = [
        "promot.py",
        "--stage",
        "joint",
        "--model",
        tied,
        "--data-dir",
        env["data"],
        "--task",
        "toy_tf",
        "--steps",
        "3",
        "--save-every",
        "3",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--prompt-length",
        "5",
        "--dropout",
        "0",
        "--no-eval",
    ]
    one = env["root"] / "one"
    two = env["root"] / "two"
    subprocess.run(
        [sys.executable, *common, "--out", str(one)], cwd=ROOT, check=True, capture_output=True
    )
    torchrun(*common, "--out", str(two))
    for name in ("model.safetensors", "prompt.safetensors"):
        a = load_file(str(one / "joint" / "final" / name))
        b = load_file(str(two / "joint" / "final" / name))
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    pre = load_file(os.path.join(tied, "model.safetensors"))
    moved = load_file(str(two / "joint" / "final" / "model.safetensors"))
    assert not torch.equal(pre["shared.weight"], moved["shared.weight"])  # it trained
    assert "lm_head.weight" not in moved  # still tied


def test_two_ranks_resume_and_score_like_one(env):
    """Stage 1 (frozen sharded model, replicated prompt) with checkpoint scoring under FSDP,
    stopped and resumed: the final prompt equals the single-process one."""
    common = [
        "promot.py",
        "--stage",
        "1",
        "--model",
        env["model"],
        "--data-dir",
        env["data"],
        "--task",
        "toy_tf",
        "--steps",
        "4",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--prompt-length",
        "5",
        "--dropout",
        "0",
        "--eval-examples",
        "4",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "3",
    ]
    one = env["root"] / "s1_one"
    two = env["root"] / "s1_two"
    subprocess.run(
        [sys.executable, *common, "--out", str(one)], cwd=ROOT, check=True, capture_output=True
    )
    torchrun(*common, "--out", str(two), "--stop-after-step", "2")
    torchrun(*common, "--out", str(two), "--resume")
    a = load_file(str(one / "stage1" / "final" / "prompt.safetensors"))["prompt"]
    b = load_file(str(two / "stage1" / "final" / "prompt.safetensors"))["prompt"]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert (two / "stage1" / "best" / "prompt.safetensors").exists()


def test_two_ranks_stage2_bf16_checkpointed_resume_is_bitwise(env):
    """The 13B configuration in miniature: FSDP2 mixed precision (bf16 compute, fp32
    master weights and reduction), per-block activation checkpointing, dropout on.
    Stage-2 checkpoints hold DTensor shards of the weights and of Adafactor's state
    (torch.distributed.checkpoint, one file per rank); stopping and resuming on 2
    ranks ends bit-identical to running straight through. Multi-task, and checkpoints
    are scored in between (decoding must leave FSDP's state as it found it)."""
    prompt = env["root"] / "p.safetensors"
    from support import prompt_formats

    prompt_formats.save_prompts(
        {"toy_tf": torch.rand(5, 32, generator=torch.Generator().manual_seed(3))}, str(prompt)
    )
    common = [
        "promot.py",
        "--stage",
        "2",
        "--prompt",
        str(prompt),
        "--model",
        env["model"],
        "--data-dir",
        env["data"],
        "--task",
        "toy_tf,toy_copy",
        "--steps",
        "4",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--prompt-length",
        "5",
        "--dtype",
        "bfloat16",
        "--activation-checkpointing",
        "--eval-examples",
        "3",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "3",
    ]
    straight, cut = env["root"] / "s2_straight", env["root"] / "s2_cut"
    torchrun(*common, "--out", str(straight))
    torchrun(*common, "--out", str(cut), "--stop-after-step", "3")
    assert sorted(os.listdir(cut / "stage2" / "checkpoints")) == ["step_0000003"]
    torchrun(*common, "--out", str(cut), "--resume")
    a = load_file(str(straight / "stage2" / "final" / "model.safetensors"))
    b = load_file(str(cut / "stage2" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pre = load_file(os.path.join(env["model"], "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in b.values())  # fp32 master weights
    assert not torch.equal(b["shared.weight"], pre["shared.weight"])
