"""promot.py as a user runs it, on a tiny T5.1.1 and two toy tasks (tests/promot_fixtures.py).

What each stage may change (bit for bit), exact resume, SIGTERM, NaN, every
bad input of the issue, and stage 1 -> stage 2 -> evaluate end to end.
"""

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import model as model_lib
import promot
import promot_fixtures as pf
from support import fsdp, prompt_formats, t5x_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--batch-size",
    "4",
    "--prompt-length",
    "5",
    "--log-every",
    "1",
    "--eval-examples",
    "4",
    "--num-beams",
    "2",
    "--max-new-tokens",
    "4",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("promot")
    spiece = pf.make_spiece(str(d / "spiece"))
    return dict(
        model=pf.make_model_dir(str(d / "model"), spiece),
        data=pf.make_data_dir(str(d / "data")),
        root=d,
    )


def args(env, out, stage, *extra, task="toy_tf", steps=3, save_every=3):
    return [
        "--stage",
        stage,
        "--model",
        env["model"],
        "--data-dir",
        env["data"],
        "--task",
        task,
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
        *TINY,
        *extra,
    ]


def train(argv):
    return promot.train(promot.parse_args(argv))


def pretrained(env):
    return model_lib.load_pretrained(env["model"]).state_dict()


def same_tensors(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stage1_run(env):
    out = env["root"] / "run_promot"
    return out, train(args(env, out, "1", steps=4, save_every=2))


# --- what each stage trains ---------------------------------------------------


def test_stage1_changes_only_the_prompt(env, stage1_run):
    out, run = stage1_run
    assert same_tensors({k: v.detach() for k, v in run.model.state_dict().items()}, pretrained(env))
    init = (
        torch.rand(5, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    )  # uniform U[0, 0.5), seed 0
    final = load_file(str(out / "stage1" / "final" / "prompt.safetensors"))["prompt"]
    assert final.shape == (5, 32) and not torch.equal(final, init)
    torch.testing.assert_close(run.prompts["toy_tf"].detach(), final)
    assert not (
        out / "stage1" / "final" / "model.safetensors"
    ).exists()  # the model was not trained


def test_stage1_records_config_log_and_best_checkpoint(stage1_run):
    out, _ = stage1_run
    config = json.load(open(out / "config.json"))
    assert config["stage1"]["lr"] == 0.2 and config["stage1"]["prompt_length"] == 5
    lines = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(k in steps[0] for k in ("loss", "lr", "tokens_per_s"))
    evals = [r for r in lines if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]  # every --save-every steps, App. B.4
    best = json.load(open(out / "stage1" / "best.json"))
    assert best["step"] == max(evals, key=lambda r: (r["score"], -r["step"]))["step"]
    assert (out / "stage1" / "best" / "prompt.safetensors").exists()


def test_exports_hold_the_prompt_as_a_peft_adapter_too(stage1_run):
    from support import prompt_formats

    out, run = stage1_run
    final = out / "stage1" / "final"
    adapter = prompt_formats.read_peft_adapter(str(final / "peft_toy_tf"), d_model=32)
    assert torch.equal(adapter, load_file(str(final / "prompt.safetensors"))["prompt.toy_tf"])
    assert (
        json.load(open(final / "peft_toy_tf" / "adapter_config.json"))["peft_type"]
        == "PROMPT_TUNING"
    )


def test_stage2_keeps_the_prompt_bit_identical_and_uses_it(env, stage1_run):
    out, _ = stage1_run
    stage1_prompt = load_file(str(out / "stage1" / "best" / "prompt.safetensors"))["prompt"]
    run = train(args(env, out, "2", steps=2, save_every=2))
    assert torch.equal(run.prompts["toy_tf"].detach(), stage1_prompt)
    assert torch.equal(
        load_file(str(out / "stage2" / "final" / "prompt.safetensors"))["prompt"], stage1_prompt
    )
    trained = {k: v.detach() for k, v in run.model.state_dict().items()}
    assert not same_tensors(trained, pretrained(env))
    # ... and the prompt shapes the update: another prompt, same everything else, other weights
    other = env["root"] / "other_prompt.safetensors"
    prompt_formats.save_prompts({"toy_tf": stage1_prompt + 1.0}, str(other))
    run_other = train(
        args(
            env,
            env["root"] / "run_other_prompt",
            "2",
            "--prompt",
            str(other),
            steps=2,
            save_every=2,
        )
    )
    assert not same_tensors(
        trained, {k: v.detach() for k, v in run_other.model.state_dict().items()}
    )


def test_joint_tuning_changes_prompt_and_model(env):
    run = train(args(env, env["root"] / "run_joint", "joint", "--no-eval", steps=2, save_every=2))
    init = torch.rand(5, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    assert not torch.equal(run.prompts["toy_tf"].detach(), init)
    assert not same_tensors(
        {k: v.detach() for k, v in run.model.state_dict().items()}, pretrained(env)
    )


def test_random_prompt_baseline_keeps_its_random_prompt_fixed(env):
    run = train(
        args(env, env["root"] / "run_random", "random-prompt", "--no-eval", steps=2, save_every=2)
    )
    init = torch.rand(5, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    assert torch.equal(run.prompts["toy_tf"].detach().cpu(), init)


def test_finetune_baseline_has_no_prompt(env):
    out = env["root"] / "run_ft"
    run = train(args(env, out, "finetune", "--no-eval", steps=2, save_every=2))
    assert run.prompts == {}
    assert not (out / "finetune" / "final" / "prompt.safetensors").exists()
    assert (out / "finetune" / "best" / "model.safetensors").exists()  # --no-eval: best = last


def test_multitask_stage1_tunes_each_prompt_apart_with_its_own_best_checkpoint(env):
    """§5.4: "a soft prompt for each task": each prompt is tuned on its own task's data, as if alone,
    keeps its own best checkpoint, and stage 2 reads them all from one file."""
    out = env["root"] / "run_multi"
    flags = ("--shots", "1", "--eval-examples", "4", "--num-beams", "1", "--max-new-tokens", "3")
    train(args(env, out, "1", *flags, task="toy_tf,toy_copy", steps=4, save_every=2))
    saved = load_file(str(out / "stage1" / "best" / "prompt.safetensors"))
    assert sorted(saved) == ["prompt.toy_copy", "prompt.toy_tf"]
    for name in ("toy_tf", "toy_copy"):
        alone = train(
            args(
                env,
                env["root"] / f"run_alone_{name}",
                "1",
                *flags,
                task=name,
                steps=4,
                save_every=2,
            )
        )
        each = json.load(open(out / "stage1" / "tasks" / name / "stage1" / "best.json"))
        assert (each["step"], each["scores"]) == (alone.best["step"], alone.best["scores"])
        assert torch.equal(
            saved[f"prompt.{name}"],
            load_file(
                str(env["root"] / f"run_alone_{name}" / "stage1" / "best" / "prompt.safetensors")
            )[f"prompt.{name}"],
        )
    final = load_file(str(out / "stage1" / "final" / "prompt.safetensors"))
    assert not torch.equal(final["prompt.toy_tf"], final["prompt.toy_copy"])
    training = json.load(open(out / "stage1" / "best" / "training.json"))
    chosen = (training["shots"], training["chosen_by"], training["chosen_at_shots"])
    assert chosen == (1, "validation score at 0-shot", 0)  # Table 2: "0-shot in fine-tuning tasks"
    run2 = train(args(env, out, "2", "--no-eval", task="toy_tf,toy_copy", steps=1, save_every=1))
    for name in ("toy_tf", "toy_copy"):
        assert torch.equal(run2.prompts[name].detach(), saved[f"prompt.{name}"])


def test_multitask_stage1_stopped_in_its_second_task_resumes_there(env):
    out, common = env["root"] / "run_multi_cut", ("--no-eval", "--task", "toy_tf,toy_copy")
    straight = env["root"] / "run_multi_straight"
    train(args(env, straight, "1", *common, steps=2, save_every=1))
    assert (
        promot.main(args(env, out, "1", *common, "--stop-after-step", "1", steps=2, save_every=1))
        == 0
    )
    assert (
        promot.main(
            args(
                env, out, "1", *common, "--resume", "--stop-after-step", "1", steps=2, save_every=1
            )
        )
        == 0
    )
    assert (
        out / "stage1" / "tasks" / "toy_copy" / "stage1" / "checkpoints"
    ).is_dir()  # the first one is done
    assert not (out / "stage1" / "final").exists()
    assert promot.main(args(env, out, "1", *common, "--resume", steps=2, save_every=1)) == 0
    a = load_file(str(straight / "stage1" / "final" / "prompt.safetensors"))
    b = load_file(str(out / "stage1" / "final" / "prompt.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_init_from_vocabulary_and_text(env):
    table = model_lib.load_pretrained(env["model"]).shared.weight.detach()
    for init in ("vocab", "text"):
        run = train(
            args(
                env,
                env["root"] / f"run_init_{init}",
                "1",
                "--no-eval",
                "--prompt-init",
                init,
                "--lr",
                "0",
                "--weight-decay",
                "0",
                steps=1,
                save_every=1,
            )
        )
        prompt = run.prompts["toy_tf"].detach()
        if init == "vocab":  # every row is a row of the embedding table (lr 0: unchanged)
            assert all((table == row).all(-1).any() for row in prompt)
    import data

    tok = data.Tokenizer(os.path.join(env["model"], "spiece.model"))
    true_ids = [i for i in tok.encode("True") if i != 1]
    torch.testing.assert_close(prompt[0], table[true_ids].mean(0))  # row 0 = the label word "True"


# --- resume, signals, divergence ---------------------------------------------


def test_kill_and_resume_equals_an_uninterrupted_run_bitwise(env):
    full = train(
        args(
            env,
            env["root"] / "run_full",
            "2",
            "--prompt",
            str(env["root"] / "p.safetensors"),
            "--no-eval",
            steps=4,
            save_every=2,
        )
        if _write_prompt(env)
        else None
    )
    out = env["root"] / "run_cut"
    cut = train(
        args(
            env,
            out,
            "2",
            "--prompt",
            str(env["root"] / "p.safetensors"),
            "--no-eval",
            "--stop-after-step",
            "3",
            steps=4,
            save_every=2,
        )
    )
    assert cut.step == 3
    resumed = train(
        args(
            env,
            out,
            "2",
            "--prompt",
            str(env["root"] / "p.safetensors"),
            "--no-eval",
            "--resume",
            steps=4,
            save_every=2,
        )
    )
    assert resumed.step == 4
    a = {k: v.detach() for k, v in full.model.state_dict().items()}
    b = {k: v.detach() for k, v in resumed.model.state_dict().items()}
    assert same_tensors(a, b)  # dropout 0.1 is on: RNG, data position and optimizer all restored


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(env):
    """A hard kill (no chance to save) loses only the steps since the last checkpoint;
    a half-written checkpoint (step_N.tmp) is ignored."""
    steps = 12
    extra = ["--no-eval", "--log-every", "1"]
    reference = train(
        args(env, env["root"] / "run_ref_kill", "finetune", *extra, steps=steps, save_every=1)
    )
    out = env["root"] / "run_kill"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "promot.py"),
        *args(env, out, "finetune", *extra, steps=steps, save_every=1),
    ]
    # one thread like this pytest process (conftest): bitwise equality needs the same kernels
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count('"loss"') >= 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    killed_at = log.read_text().count('"loss"')
    assert killed_at < steps, "the run finished before it could be killed"
    resumed = train(args(env, out, "finetune", *extra, "--resume", steps=steps, save_every=1))
    assert resumed.step == steps
    assert same_tensors(
        {k: v.detach() for k, v in reference.model.state_dict().items()},
        {k: v.detach() for k, v in resumed.model.state_dict().items()},
    )


def _write_prompt(env):
    prompt_formats.save_prompts(
        {"toy_tf": torch.rand(5, 32, generator=torch.Generator().manual_seed(3))},
        str(env["root"] / "p.safetensors"),
    )
    return True


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(env):
    out = env["root"] / "run_sigterm"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "promot.py"),
        *args(env, out, "1", "--no-eval", steps=100000, save_every=100000),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and '"loss"' in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM" in stdout and "--resume" in stdout
    stopped = [json.loads(line) for line in open(log) if '"stopped"' in line]
    step = stopped[0]["step"]
    assert os.path.isdir(out / "stage1" / "checkpoints" / f"step_{step:07d}")
    run = train(args(env, out, "1", "--no-eval", "--resume", steps=step + 1, save_every=100000))
    assert run.step == step + 1


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(env, capsys):
    from safetensors.torch import save_file

    bad = env["root"] / "nan_model"
    shutil.copytree(env["model"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["lm_head.weight"][:] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    out = env["root"] / "run_nan"
    argv = args(env, out, "finetune", "--no-eval", steps=3, save_every=1)
    argv[argv.index("--model") + 1] = str(bad)
    assert promot.main(argv) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 1" in err and "--resume" in err
    assert not (out / "finetune" / "checkpoints").exists() or not os.listdir(
        out / "finetune" / "checkpoints"
    )


# --- bad inputs: one clear message, exit code 2, nothing overwritten ---------


def _fails(argv, capsys, *words):
    assert promot.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("promot.py: error:") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def test_missing_model_directory(env, capsys, tmp_path):
    argv = args(env, tmp_path / "o", "1")
    argv[argv.index("--model") + 1] = str(tmp_path / "nope")
    _fails(argv, capsys, "--model", "nope", "no such checkpoint directory")
    assert not (tmp_path / "o").exists()


def test_missing_data(env, capsys, tmp_path):
    argv = args(env, tmp_path / "o", "1")
    argv[argv.index("--data-dir") + 1] = str(tmp_path / "nodata")
    _fails(argv, capsys, "--data-dir", "no such directory")
    _fails(args(env, tmp_path / "o", "1", task="not_a_task"), capsys, "not_a_task")
    assert not (tmp_path / "o").exists()


def test_stage2_without_a_stage1_prompt(env, capsys, tmp_path):
    _fails(args(env, tmp_path / "o", "2"), capsys, "stage-1 prompt", "--prompt")
    assert not (tmp_path / "o").exists()


def test_prompt_of_the_wrong_width(env, capsys, tmp_path):
    prompt_formats.save_prompts(
        {"toy_tf": torch.zeros(5, 16)}, str(tmp_path / "narrow.safetensors")
    )
    _fails(
        args(env, tmp_path / "o", "2", "--prompt", str(tmp_path / "narrow.safetensors")),
        capsys,
        "narrow.safetensors",
        "(5, 16)",
        "d_model = 32",
    )


def test_batch_size_not_divisible(env, capsys, tmp_path):
    _fails(
        args(env, tmp_path / "o", "1", "--micro-batch-size", "3"),
        capsys,
        "--micro-batch-size 3",
        "4",
    )


def test_existing_run_without_resume_is_refused_and_untouched(env, capsys, stage1_run):
    out, _ = stage1_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    _fails(args(env, out, "1"), capsys, "--resume", "nothing was overwritten")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_foreign_non_empty_out_is_refused(env, capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    _fails(args(env, tmp_path / "o", "1"), capsys, "not empty")
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_resume_with_another_configuration_names_the_setting(env, capsys, tmp_path):
    out = tmp_path / "o"
    train(args(env, out, "1", "--no-eval", steps=1, save_every=1))
    err = _fails(
        args(
            env,
            out,
            "1",
            "--no-eval",
            "--resume",
            "--label-smoothing",
            "0.2",
            steps=2,
            save_every=1,
        ),
        capsys,
        "--label-smoothing",
        "0.0",
        "0.2",
    )
    assert "--steps" not in err  # more steps is a legitimate resume


def test_resume_may_change_lr_and_records_it(env, tmp_path):
    """The NaN advice ("a lower --lr, then --resume") must work; config.json and the log say what ran."""
    out = tmp_path / "o"
    train(args(env, out, "1", "--no-eval", steps=1, save_every=1))
    run = train(args(env, out, "1", "--no-eval", "--resume", "--lr", "0.05", steps=2, save_every=1))
    assert run.step == 2 and all(g["lr"] == 0.05 for g in run.optimizer.param_groups)
    assert json.load(open(out / "config.json"))["stage1"]["lr"] == 0.05
    steps = [json.loads(line) for line in open(out / "log.jsonl") if '"loss"' in line]
    assert [(r["step"], r["lr"]) for r in steps] == [(1, 0.2), (2, 0.05)]


def test_resume_accepts_the_same_paths_written_differently(env, tmp_path):
    out = tmp_path / "o"
    train(args(env, out, "1", "--no-eval", steps=1, save_every=1))
    argv = args(env, out, "1", "--no-eval", "--resume", steps=2, save_every=1)
    argv[argv.index("--model") + 1] = env["model"] + os.sep  # a trailing slash
    argv[argv.index("--data-dir") + 1] = os.path.relpath(env["data"])
    assert train(argv).step == 2


# --- end to end --------------------------------------------------------------


def test_end_to_end_stage1_stage2_then_evaluate(env, tmp_path):
    """The user's path: stage 1, stage 2 (picks stage 1's best prompt), then the
    exported model and prompt read back by model.py and by transformers."""
    out = tmp_path / "run"
    assert promot.main(args(env, out, "1", steps=2, save_every=1)) == 0
    assert promot.main(args(env, out, "2", steps=2, save_every=1)) == 0
    best = out / "stage2" / "best"
    t5 = model_lib.load_pretrained(str(best)).eval()
    prompt = prompt_formats.read_prompts(str(best / "prompt.safetensors"), 32, ["toy_tf"], 5)[
        "toy_tf"
    ]
    assert torch.equal(
        prompt, load_file(str(out / "stage1" / "best" / "prompt.safetensors"))["prompt"]
    )
    # evaluate.py reads the exported folder and prompt as they are
    import data
    import evaluate

    results = tmp_path / "results.json"
    assert (
        evaluate.main(
            [
                "--model",
                str(best),
                "--data-dir",
                env["data"],
                "--out",
                str(results),
                "--eval-tasks",
                "toy_copy",
                "--shots",
                "1",
                "--prompt",
                str(best / "prompt.safetensors"),
                "--eval-examples",
                "3",
                "--num-beams",
                "2",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    runs = json.load(open(results))["runs"]
    assert [(r["task"], r["prompt"]) for r in runs] == [
        ("toy_tf", True),
        ("toy_copy", False),
    ]  # routed by format
    tok = data.Tokenizer(str(best / "spiece.model"))
    ids, mask = data.pad_batch(
        [tok.encode("the cat sat question: is there a cat? answer: <extra_id_0>")]
    )
    # transformers reads the same directory: same logits with the prompt as inputs_embeds
    from helpers import load_oracle

    hf = load_oracle(str(best))
    labels = torch.tensor([[5, 6, 1]])
    dec = model_lib.shift_right(labels)
    ours = t5(ids, mask, dec, prompt=prompt)
    embeds = torch.cat([prompt[None], hf.get_input_embeddings()(ids)], 1)
    theirs = hf(
        inputs_embeds=embeds,
        attention_mask=torch.cat([torch.ones(1, 5, dtype=torch.long), mask], 1),
        decoder_input_ids=dec,
    ).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# --- memory options ------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_weights(env):
    """Recomputing each block in backward (same dropout masks: the RNG state is saved
    with the block input) must not change the result."""
    plain = train(
        args(env, env["root"] / "run_noac", "finetune", "--no-eval", steps=2, save_every=2)
    )
    ckpt = train(
        args(
            env,
            env["root"] / "run_ac",
            "finetune",
            "--no-eval",
            "--activation-checkpointing",
            steps=2,
            save_every=2,
        )
    )
    a = {k: v.detach() for k, v in plain.model.state_dict().items()}
    b = {k: v.detach() for k, v in ckpt.model.state_dict().items()}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_bfloat16_trains_with_float32_master_weights(env):
    out = env["root"] / "run_bf16"
    run = train(args(env, out, "joint", "--no-eval", "--dtype", "bfloat16", steps=2, save_every=2))
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert not same_tensors(
        {k: v.detach() for k, v in run.model.state_dict().items()}, pretrained(env)
    )
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl") if '"loss"' in line]
    assert all(loss == loss and loss < 100 for loss in losses)  # finite


def test_long_inputs_are_cut_in_the_query_text_keeping_template_and_sentinel(env):
    import data

    cfg = promot.parse_args(args(env, env["root"] / "unused", "1", "--max-input-tokens", "16"))
    task = data.get_task("toy_tf", env["data"])
    train_set = data.load_split(task, env["data"], "train")
    long_example = data.Example({"input": " ".join(["dog sat on the mat"] * 20)}, ["False"])
    mixture = data.Mixture({"toy_tf": [long_example]}, seed=0)
    tok = data.Tokenizer(os.path.join(env["model"], "spiece.model"))
    assert cfg.truncation == "end"  # the paper's cut; "fair" keeps the template and sentinel
    for truncation in ("end", "fair"):
        rows = data.rank_batch(
            mixture,
            [task],
            [train_set],
            cfg.batch_size,
            tokenizer=tok,
            max_input_tokens=cfg.max_input_tokens,
            truncation=truncation,
        )
        text = rows[0][1]
        assert len(tok.encode(text)) <= 16
        kept = text.endswith("question: is there a cat? answer: <extra_id_0>")
        assert kept == (truncation == "fair")  # "end" keeps the input's first words instead
        assert text.startswith("dog sat on the mat") == (truncation == "end")


def test_train_step_loss_is_token_mean_cross_entropy_plus_t5x_z_loss(env):
    """T5X: loss = sum over target tokens of (smoothed CE + z_loss * logsumexp(logits)^2),
    divided by the number of target tokens of the global batch."""
    from types import SimpleNamespace

    t5 = model_lib.load_pretrained(env["model"])
    model_lib.set_dropout(t5, 0.0)
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    labels = torch.tensor([[10, 11, 1], [12, 1, -100]])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels, tasks=["x", "x"])
    cfg = SimpleNamespace(prompt_length=5, dtype="float32", label_smoothing=0.1, z_loss=1e-4)
    opt = promot.Adafactor(list(t5.parameters()), lr=0.0)
    loss, tokens = promot.train_step(t5, [batch], {}, opt, cfg, fsdp.Dist())
    with torch.no_grad():
        logits = t5(ids, batch["attention_mask"], model_lib.shift_right(labels))
    ce, n = t5x_loss.cross_entropy(logits, labels, 0.1)
    z = (torch.logsumexp(logits, -1).square() * (labels != -100)).sum()
    assert n == 5 and tokens == 7 + 5
    assert loss == pytest.approx(float((ce + 1e-4 * z) / n), rel=1e-6)


# --- the paper's defaults: checkpoint choice, multi-task mixing, scoring an export -------------


def scores_by_step(monkeypatch, table):
    """score_task replaced by {task: [score at its 1st, 2nd, ... call]}; returns the calls' shots."""
    calls = []

    def fake(model, tokenizer, task, examples, **kw):
        calls.append((task.name, kw["shots"]))
        score = table[task.name][sum(name == task.name for name, _ in calls) - 1]
        return {"score": score}

    monkeypatch.setattr(promot.evaluate, "score_task", fake)
    return calls


@pytest.mark.parametrize("select", [None, "train-shots"])
def test_a_plus_1_shot_run_chooses_its_best_checkpoint_on_0_shot_scores(env, monkeypatch, select):
    """Table 2: "We use 0-shot in fine-tuning tasks"; --select train-shots scores at --shots."""
    out = env["root"] / f"run_select_{select}"
    calls = scores_by_step(monkeypatch, {"toy_tf": [50.0, 70.0, 60.0]})
    extra = ("--shots", "1") + (("--select", select) if select else ())
    run = train(args(env, out, "1", *extra, steps=3, save_every=1))
    shots = 1 if select else 0
    assert calls == [("toy_tf", shots)] * 3 and run.best["step"] == 2
    training = json.load(open(out / "stage1" / "best" / "training.json"))
    assert training["chosen_by"] == f"validation score at {shots}-shot"
    assert (training["shots"], training["chosen_at_shots"], training["step"]) == (1, shots, 2)


@pytest.mark.parametrize("rule, best_step", [(None, 2), ("0-shot-min", 1)])
def test_multitask_best_checkpoint_is_the_tasks_mean_or_with_select_min_their_minimum(
    env, monkeypatch, rule, best_step
):
    out = env["root"] / f"run_select_score_{rule}"
    scores_by_step(monkeypatch, {"toy_tf": [10.0, 90.0], "toy_copy": [60.0, 5.0]})
    extra = ("--select", rule) if rule else ()
    run = train(args(env, out, "finetune", *extra, task="toy_tf,toy_copy", steps=2, save_every=1))
    assert run.best["step"] == best_step  # mean: 35 then 47.5; min: 10 then 5
    assert run.best["score"] == (47.5 if rule is None else 10.0)


def test_multitask_mixing_is_equal_by_default_or_examples_proportional_with_t5s_cap(env, tmp_path):
    import data

    cfg = promot.parse_args(args(env, env["root"] / "unused", "2", task="toy_tf,toy_copy"))
    assert cfg.mixing == "equal"
    pools = {"small": list(range(100)), "large": list(range(900))}

    def share(**rule):
        names = [n for n, _ in data.Mixture(pools, seed=3, **rule).take(20000)]
        return names.count("small") / len(names)

    assert abs(share() - 0.5) < 0.02
    assert abs(share(rates="proportional") - 0.1) < 0.01  # 100 / (100 + 900), under T5's cap
    assert inspect.signature(data.Mixture).parameters["cap"].default == 2**19  # T5 §3.5.3's K
    assert abs(share(rates="proportional", cap=300) - 0.25) < 0.015  # 100 / (100 + 300)
    # a recipe's setting, not a flag (docs/training.md, "Flags that are gone")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": {"mixing": "proportional"}}))
    flags = ("--recipe", str(recipe))
    cfg = promot.parse_args(args(env, env["root"] / "unused", "2", *flags, task="toy_tf,toy_copy"))
    assert cfg.mixing == "proportional"


@pytest.fixture(scope="module")
def stage2_best(env, tmp_path_factory):
    """A real ProMoT run (stage 1, stage 2) and a data folder with toy_tf2, a task of toy_tf's
    format group (its task.json says so)."""
    root = tmp_path_factory.mktemp("stage2_export")
    data_dir = root / "data"
    shutil.copytree(env["data"], data_dir)
    shutil.copytree(data_dir / "toy_tf", data_dir / "toy_tf2")
    spec = json.loads((data_dir / "toy_tf" / "task.json").read_text())
    (data_dir / "toy_tf2" / "task.json").write_text(json.dumps({**spec, "format_group": "toy_tf"}))
    local = dict(env, data=str(data_dir))
    assert promot.main(args(local, root / "run", "1", steps=2, save_every=1)) == 0
    assert promot.main(args(local, root / "run", "2", steps=2, save_every=1)) == 0
    return root / "run" / "stage2" / "best", data_dir


def evaluate_cli(best, data_dir, out, *extra):
    import evaluate

    argv = ["--model", str(best), "--data-dir", str(data_dir), "--out", str(out)]
    argv += ["--eval-tasks", "toy_tf2,toy_copy", "--shots", "0,1", "--eval-examples", "3"]
    assert evaluate.main(argv + list(extra)) == 0
    return json.loads(out.read_text())["runs"]


def test_evaluate_scores_a_stage2_best_folder_with_its_own_prompt_unless_bare_model(
    stage2_best, tmp_path, capsys
):
    best, data_dir = stage2_best
    assert (best / "prompt.safetensors").is_file() and (best / "training.json").is_file()
    runs = evaluate_cli(best, data_dir, tmp_path / "r.json", "--num-beams", "1")
    used = {(r["task"], r["shots"]): (r["role"], r["prompt"], r["route"]) for r in runs}
    # training.json names the fine-tuned task; toy_tf2 shares its format group; toy_copy not
    assert used == {
        ("toy_tf", 0): ("fine-tuned", True, "same_format"),
        ("toy_tf2", 0): ("evaluation", True, "same_format"),
        ("toy_tf2", 1): ("evaluation", True, "same_format"),
        ("toy_copy", 0): ("evaluation", False, "same_format"),
        ("toy_copy", 1): ("evaluation", False, "same_format"),
    }
    err = capsys.readouterr().err
    assert f"evaluate.py: scoring with the prompt {best / 'prompt.safetensors'}, routed by" in err
    bare = evaluate_cli(best, data_dir, tmp_path / "b.json", "--num-beams", "1", "--bare-model")
    assert [r["task"] for r in bare] == ["toy_tf2", "toy_tf2", "toy_copy", "toy_copy"]
    assert not any(r["prompt"] for r in bare)
    assert "evaluate.py: scoring the model alone (--bare-model)" in capsys.readouterr().err


def test_score_task_and_evaluate_py_give_the_same_scores_with_no_decoding_arguments(
    stage2_best, tmp_path
):
    """One decoding default everywhere (the paper's: beam 4, T5X's rule, alpha 0.6), one cut."""
    import data
    import evaluate

    best, data_dir = stage2_best
    runs = evaluate_cli(best, data_dir, tmp_path / "r.json")
    t5 = model_lib.load_pretrained(str(best)).eval()
    tok = data.Tokenizer(str(best / "spiece.model"))
    prompts = prompt_formats.read_prompts(str(best / "prompt.safetensors"), 32)
    for run in runs:
        task = data.get_task(run["task"], data_dir)
        examples = data.load_eval_split(task, data_dir)[1][:3]
        pool = data.load_split(task, data_dir, "train")
        prompt = evaluate.route_prompt(task, prompts)
        shots = run["shots"]
        ours = evaluate.score_task(t5, tok, task, examples, pool=pool, shots=shots, prompt=prompt)
        assert ours["examples"] == run["examples"] and ours["score"] == run["score"], run["task"]
