"""Hostile and mistaken inputs (issue 17): each gets one line naming what is wrong and exit 2,
no traceback, and leaves --out as it was; nothing from a run folder or checkpoint runs code;
one run per folder; a damaged checkpoint is caught; a diverged run never saves NaN weights."""

import errno
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import evaluate
import model as model_lib
import promot
import promot_fixtures as pf
from support import run_checkpoints
from support.errors import BadInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    spiece = pf.make_spiece(str(d / "spiece"))
    model = pf.make_model_dir(str(d / "model"), spiece)
    checkpoint = d / "checkpoint"  # a folder that holds a checkpoint (issue 24: never --out)
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        (checkpoint / name).write_bytes(open(os.path.join(model, name), "rb").read())
    return dict(model=model, data=pf.make_data_dir(str(d / "data")), root=d, checkpoint=checkpoint)


def train_args(env, out, *extra, stage="1", steps=2, save_every=1):
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
        "4",
        "--prompt-length",
        "5",
        "--log-every",
        "1",
        "--no-eval",
        *extra,
    ]


def with_flags(argv, flags):
    """argv with each (flag, value) of `flags` replacing the flag's value, or added."""
    argv = list(argv)
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def one_line_error(err, prefix):
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err


PROMOT_BAD = [  # (flags, words the message must hold)
    (["--lr", "-1"], ["--lr -1.0", ">= 0"]),
    (["--lr", "nan"], ["--lr nan"]),
    (["--dropout", "2"], ["--dropout 2.0", "[0, 1)"]),
    (["--label-smoothing", "2"], ["--label-smoothing"]),
    (["--label-smoothing", "-1"], ["--label-smoothing -1.0"]),
    (["--weight-decay", "2"], ["--weight-decay"]),
    (["--shots", "-1"], ["--shots -1"]),
    (["--train-examples", "-1"], ["--train-examples -1"]),
    (["--max-target-tokens", "1"], ["--max-target-tokens 1", ">= 4"]),
    (["--max-input-tokens", "0"], ["--max-input-tokens 0"]),
    (["--max-input-length", "0"], ["unrecognized arguments: --max-input-length"]),  # no aliases
    (["--shots", "0,1"], ["--shots 0,1", "one number of demonstrations"]),
    (["--steps", "0"], ["--steps 0"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size 0"]),
    (["--micro-batch-size", "3"], ["--micro-batch-size 3"]),
    (["--num-beams", "0"], ["--num-beams 0"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens -1"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints 0"]),
    (["--prompt-length", "0"], ["--prompt-length 0"]),
    (["--probe-every", "-1"], ["--probe-every -1"]),
    (["--task", "../toy_tf"], ["'../toy_tf'", "not a path"]),
    (["--task", "/etc"], ["'/etc'", "not a path"]),
    (["--lora-rank", "0", "--stage1-module", "lora"], ["--lora-rank"]),
    (["--prompt-init", "file"], ["--prompt-init file needs the prompt file"]),
    (["--prompt-init", "vocab:x"], ["--prompt-init 'vocab:x': expected uniform, vocab, text"]),
    (["--allow-change", "weights"], ["--allow-change weights: expected data, model"]),
    (["--seed", "1e23"], ["--seed invalid int value: '1e23'"]),
    (["--seed", str(10**23)], ["--seed 1000", "[0, 2**63)"]),
    (["--device", "tpu"], ["--device invalid choice: 'tpu'"]),
    (["--device", "cuda:7"], ["--device invalid choice: 'cuda:7'"]),
    # issue 24: memory a flag asks for, refused before anything is allocated
    (["--num-beams", "100000"], ["--num-beams 100000: expected at most the vocabulary size, 140"]),
    (["--prompt-length", "100000000"], ["--prompt-length 100000000", "needs at least"]),
    (["--lora-rank", "100000000", "--stage1-module", "lora"], ["--lora-rank 100000000: needs"]),
    # issue 24: --out is a run folder of its own
    (["--out", "{model}"], ["is --model", "name a folder of its own"]),
    (["--out", "{data}"], ["is --data-dir", "name a folder of its own"]),
    (["--out", "{data}/run"], ["or inside it"]),
    (["--out", "{checkpoint}"], ["holds a checkpoint (config.json and weights)"]),
]


@pytest.mark.parametrize("flags,words", PROMOT_BAD, ids=[" ".join(f) for f, _ in PROMOT_BAD])
def test_promot_refuses_bad_flags_in_one_line_before_writing(env, tmp_path, capsys, flags, words):
    out, before = tmp_path / "out", folder_state(env["root"])
    flags = [f.format(**env) for f in flags]  # "{model}": env's model folder
    assert promot.main(with_flags(train_args(env, out), flags)) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    for w in words:
        assert w.format(**env) in err, err
    assert not out.exists() and folder_state(env["root"]) == before  # nothing written anywhere


def folder_state(folder):
    """{path: (size, mtime)} of every file under `folder`: what a refused run must leave."""
    paths = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
    return {path: (os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in paths}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_promot_device_cuda_without_a_gpu(env, tmp_path, capsys):
    assert promot.main(train_args(env, tmp_path / "out", "--device", "cuda")) == 2
    one_line_error(capsys.readouterr().err, "promot.py: error: --device cuda")


def evaluate_args(env, out, *extra):
    return [
        "--model",
        env["model"],
        "--data-dir",
        env["data"],
        "--out",
        str(out),
        "--task",
        "toy_tf",
        "--eval-tasks",
        "toy_copy",
        "--shots",
        "0",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "3",
        "--eval-examples",
        "2",
        *extra,
    ]


def test_evaluate_refuses_bad_inputs_in_one_line_before_writing(env, tmp_path, capsys):
    nan_prompt = tmp_path / "nan.safetensors"
    save_file({"prompt.toy_tf": torch.full((5, 32), float("nan"))}, str(nan_prompt))
    (tmp_path / "afile").write_text("")
    weights, train = os.path.join(env["model"], "model.safetensors"), f"{env['data']}/toy_tf/t"
    before = folder_state(env["root"])
    cases = [
        # issue 24: --out replaces only a results file of ours, in a folder it can write
        (["--out", weights], "exists and is not an evaluate.py results file"),
        (["--out", f"{train}rain.jsonl"], "exists and is not an evaluate.py results file"),
        (["--out", str(tmp_path / "afile" / "r.json")], "afile is a file, not a folder"),
        (["--num-beams", "100000"], "--num-beams 100000: expected at most the vocabulary size"),
        (["--eval-batch-size", "0"], "--eval-batch-size 0"),
        (["--num-beams", "0"], "--num-beams 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1"),
        (["--max-input-tokens", "0"], "--max-input-tokens 0"),
        (["--shots", "x"], "--shots"),
        (["--model", os.path.join(env["model"], "config.json")], "not a checkpoint directory"),
        (["--out", str(tmp_path)], "--out"),
        (["--eval-tasks", "", "--task", ""], "nothing to score"),
        (["--eval-tasks", "../toy_copy"], "not a path"),
        (["--prompt", str(nan_prompt)], "NaN"),
        (
            ["--shots", "1000"],
            "1000-shot inputs need 1000 demonstrations",
        ),  # before toy_tf is scored
    ]
    for flags, words in cases:
        out = tmp_path / "r.json"
        assert evaluate.main(with_flags(evaluate_args(env, out), flags)) == 2, flags
        err = capsys.readouterr().err
        one_line_error(err, "evaluate.py: error:")
        assert words in err, (flags, err)
        assert not out.exists(), flags
    assert folder_state(env["root"]) == before  # the model and the data are as they were


def test_a_shard_index_that_points_outside_the_folder_is_refused(env, tmp_path):
    ckpt = tmp_path / "ckpt"
    os.makedirs(ckpt)
    for name in ("config.json", "spiece.model"):
        (ckpt / name).write_bytes(open(os.path.join(env["model"], name), "rb").read())
    (tmp_path / "outside.safetensors").write_bytes(
        open(os.path.join(env["model"], "model.safetensors"), "rb").read()
    )
    with open(ckpt / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"shared.weight": "../outside.safetensors"}}, f)
    with pytest.raises(model_lib.DamagedFile, match="not a file of this folder"):
        model_lib.load_pretrained(str(ckpt))


# --- the run folder -------------------------------------------------------------------------


def test_a_run_folder_in_use_is_refused_naming_the_process(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        assert promot.main(train_args(env, out)) == 2
        err = capsys.readouterr().err
        one_line_error(err, "promot.py: error:")
        assert f"in use by process {holder.pid}" in err
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    assert promot.main(train_args(env, out, steps=1)) == 0
    assert not (out / ".lock").exists()  # released at the end


class Payload:
    """Unpickling this creates a file: what a crafted .metadata or rng_*.pt could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_unpickles_what_a_run_folder_holds(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert promot.main(train_args(env, out, "--stop-after-step", "1")) == 0
    ckpt = run_checkpoints.latest_checkpoint(str(out / "stage1" / "checkpoints"))
    marker = tmp_path / "pwned"
    for name in (
        ".metadata",
        "rng_rank0.pt",
    ):  # the old torch.distributed.checkpoint layout's pickles
        with open(os.path.join(ckpt, name), "wb") as f:
            pickle.dump(Payload(str(marker)), f)
    assert promot.main(train_args(env, out, "--resume")) == 0  # reads only safetensors and JSON
    assert not marker.exists()
    out2 = tmp_path / "out2"  # a checkpoint in the old layout: only the pickles
    assert promot.main(train_args(env, out2, "--stop-after-step", "1")) == 0
    old = run_checkpoints.latest_checkpoint(str(out2 / "stage1" / "checkpoints"))
    os.remove(os.path.join(old, "rank0.safetensors"))
    with open(os.path.join(old, ".metadata"), "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    capsys.readouterr()
    assert promot.main(train_args(env, out2, "--resume")) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    assert "older promot" in err and "not read" in err and not marker.exists()


def _flip_a_byte(path):
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_a_damaged_checkpoint_is_caught_and_the_one_before_is_used(env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_args(env, out, "--keep-checkpoints", "2", "--stop-after-step", "2", steps=3)
    assert promot.main(argv) == 0
    folder = str(out / "stage1" / "checkpoints")
    newest = run_checkpoints.latest_checkpoint(folder)
    _flip_a_byte(os.path.join(newest, "rank0.safetensors"))
    capsys.readouterr()
    run = promot.train(
        promot.parse_args(train_args(env, out, "--keep-checkpoints", "2", "--resume", steps=3))
    )
    printed = capsys.readouterr().out
    assert "SHA-256 mismatch" in printed and "resuming from an older" in printed
    assert "resumed from" in printed
    assert "step_0000001 (step 1)" in printed and run.step == 3


def test_a_damaged_only_checkpoint_is_one_clear_error(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert promot.main(train_args(env, out, "--stop-after-step", "1")) == 0
    _flip_a_byte(
        os.path.join(
            run_checkpoints.latest_checkpoint(str(out / "stage1" / "checkpoints")),
            "rank0.safetensors",
        )
    )
    capsys.readouterr()
    assert promot.main(train_args(env, out, "--resume")) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    assert "SHA-256 mismatch" in err


def test_a_full_disk_is_one_line_naming_the_file_and_the_intact_checkpoint(
    env, tmp_path, capsys, monkeypatch
):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert promot.main(train_args(env, tmp_path / "out", steps=3)) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error: cannot write")
    assert "rank0.safetensors (no space left on the device)" in err
    assert "step_0000001 is intact" in err


def test_weights_that_diverge_are_never_saved_as_a_good_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        promot.main(train_args(env, out, "--lr", "1e300")) == 1
    )  # a finite loss, then inf weights
    err = capsys.readouterr().err
    assert "NaN or inf after step 1; not saved" in err and "last good checkpoint is none" in err
    assert run_checkpoints.latest_checkpoint(str(out / "stage1" / "checkpoints")) is None


def test_leftovers_of_a_killed_write_are_removed_on_the_next_run(env, tmp_path):
    out = tmp_path / "out"
    assert promot.main(train_args(env, out, "--stop-after-step", "1")) == 0
    stage = out / "stage1"
    leftovers = [
        stage / "best.tmp-abc123",
        stage / "checkpoints" / "step_0000002.tmp",
        stage / "best.json.tmp.999",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"partial")
    leftovers[1].mkdir()
    leftovers[2].write_text("{")
    assert promot.main(train_args(env, out, "--resume")) == 0
    assert not any(p.exists() for p in leftovers)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("d_model", "128", "a non-negative integer"),
        ("layer_norm_epsilon", "1e-6", "a non-negative number"),
        ("num_layers", 2.5, "a non-negative integer"),
        ("tie_word_embeddings", "false", "true or false"),
    ],
)
def test_a_config_json_of_the_wrong_types_is_one_clear_error(
    env, tmp_path, capsys, key, value, expected
):
    bad = tmp_path / "model"
    os.makedirs(bad)
    for name in os.listdir(env["model"]):
        (bad / name).write_bytes(open(os.path.join(env["model"], name), "rb").read())
    config = json.load(open(bad / "config.json"))
    config[key] = value
    json.dump(config, open(bad / "config.json", "w"))
    argv = train_args(env, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(bad)
    assert promot.main(argv) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    assert f"{key} is {value!r}; expected {expected}" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "spec,words",
    [
        ({"template": "{input"}, "not a format string"),
        ({"template": "{0} A:"}, "needs named fields"),
        ({"template": 5}, "not a format string"),
        ({"template": "Q: {input} A:", "label_words": "True"}, 'label_words is "True"'),
        ({"template": "Q: {input} A:", "label_words": []}, "label_words is []"),
        # issue 24: plain fields only (a width of 9999999999 took 8 GB), plain split names
        ({"template": "{input:>9999999999}"}, "field 'input' has a format spec or conversion"),
        ({"template": "{input:d}"}, "field 'input' has a format spec or conversion"),
        ({"template": "{input!z}"}, "field 'input' has a format spec or conversion"),
        ({"template": "{input!r}"}, "field 'input' has a format spec or conversion"),
        ({"eval_split": "../../outside/secret"}, 'eval_split is "../../outside/secret"; expected'),
        ({"demo_split": "/etc/passwd"}, 'demo_split is "/etc/passwd"; expected a split name'),
        ({"eval_split": ["test"]}, 'eval_split is ["test"]; expected a split name'),
        ({"max_input_tokens": 0}, "max_input_tokens is 0; expected an integer >= 1"),
    ],
)
def test_a_bad_task_json_is_one_clear_error(tmp_path, spec, words):
    import data

    folder = tmp_path / "mytask"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps(spec))
    with pytest.raises(data.BadInput, match="task.json: ") as raised:
        data.get_task("mytask", tmp_path)
    assert words in str(raised.value)


def copy_data(env, folder):
    import shutil

    shutil.copytree(env["data"], folder)
    return str(folder)


@pytest.mark.parametrize("change", ["reordered", "shrunk", "one label edited"])
def test_changed_training_data_on_resume_is_refused_unless_allowed(env, tmp_path, capsys, change):
    data_dir, out = copy_data(env, tmp_path / "data"), tmp_path / "out"
    argv = with_flags(train_args(env, out, steps=3), ["--data-dir", data_dir])
    assert promot.main(argv + ["--stop-after-step", "1"]) == 0
    train = tmp_path / "data" / "toy_tf" / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    if change == "reordered":
        lines = lines[1:] + lines[:1]
    elif change == "shrunk":
        lines = lines[:-5]
    else:
        record = json.loads(lines[7])
        record["target"] = "False" if record["target"] == "True" else "True"
        lines[7] = json.dumps(record) + "\n"
    train.write_text("".join(lines))
    capsys.readouterr()
    before = sorted(os.listdir(out / "stage1" / "checkpoints"))
    assert promot.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error: --resume: the data changed")
    assert "toy_tf train" in err and "--allow-change data" in err
    assert sorted(os.listdir(out / "stage1" / "checkpoints")) == before
    assert promot.main(argv + ["--resume", "--allow-change", "data"]) == 0  # the user's; recorded
    saved = json.load(open(out / "config.json"))["stage1"]
    assert saved["data"]["toy_tf train"].startswith(f"{len(lines)} examples")


def test_resume_accepts_the_same_data_in_a_copied_or_moved_folder(env, tmp_path, capsys):
    data_dir, out = copy_data(env, tmp_path / "data"), tmp_path / "out"
    argv = with_flags(train_args(env, out, steps=2), ["--data-dir", data_dir])
    assert promot.main(argv + ["--stop-after-step", "1"]) == 0
    os.rename(tmp_path / "data", tmp_path / "moved")
    moved = str(tmp_path / "moved") + "/"  # the same files; and a trailing slash is the same place
    os.rename(out, tmp_path / "out2")
    argv = with_flags(argv, ["--data-dir", moved, "--out", str(tmp_path / "out2")])
    assert promot.main(argv + ["--resume"]) == 2  # --data-dir is a setting: named, one line
    assert "--data-dir" in capsys.readouterr().err
    os.rename(tmp_path / "moved", tmp_path / "data")
    argv = with_flags(argv, ["--data-dir", data_dir])
    assert promot.main(argv + ["--resume"]) == 0  # a moved run folder resumes
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_is_refused_before_any_work(env, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert promot.main(train_args(env, locked / "run")) == 2
        one_line_error(capsys.readouterr().err, "promot.py: error: --out")
    finally:
        locked.chmod(0o700)


def test_an_out_below_a_file_is_refused_before_any_work(env, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    assert promot.main(train_args(env, tmp_path / "notes.txt" / "run")) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error: --out")
    assert "notes.txt is a file, not a folder" in err


def test_resume_under_another_number_of_ranks_names_the_ranks(env, tmp_path):
    out = tmp_path / "out"
    os.makedirs(out / "stage1")
    (out / "stage1" / "x").write_text("")
    cfg = promot.parse_args(train_args(env, out, "--resume"))
    settings = {**promot.asdict(cfg), "world_size": 1}
    json.dump({"stage1": {**settings, "world_size": 2}}, open(out / "config.json", "w"))
    with pytest.raises(BadInput, match=r"ranks \(torchrun --nproc-per-node\): saved 2"):
        run_checkpoints.check_run_folder(
            str(out), "stage1", True, settings, promot.RESUMABLE_CHANGES
        )


BAD_DATA = [  # (task.json, the third line of train.jsonl, words the message must hold)
    (
        {"template": "{input} answer:", "label_words": ["True", "False"], "metric": "accuracy"},
        '{"input": "a b", "target": "Maybe"}',
        ['train.jsonl:3: target "Maybe" is not one of the task\'s label_words'],
    ),
    (
        {"template": "{input} answer:"},
        '{"input": "a \\ud800 b", "target": "True"}',
        ["train.jsonl:3: a lone UTF-16 surrogate (\\ud800)"],
    ),
    (
        {"template": "{input} {question} answer:"},
        '{"input": "a b", "target": "True"}',
        ["train.jsonl:3: no field 'question' for the template's {question}"],
    ),
]


@pytest.mark.parametrize(
    "case",
    range(len(BAD_DATA)),
    ids=["label outside label_words", "lone surrogate", "template field missing"],
)
def test_bad_data_is_one_line_from_data_check_and_before_promot_writes(env, tmp_path, capsys, case):
    import data

    spec, line, words = BAD_DATA[case]
    task = f"bad_data_{case}"  # a name of its own: the task registry keeps a name's first task.json
    folder = tmp_path / "data" / task
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(spec))
    good = json.dumps({"input": "a b", "question": "q", "target": "True"}) + "\n"
    (folder / "train.jsonl").write_text(good * 2 + line + "\n")
    (folder / "validation.jsonl").write_text(good)
    try:
        assert data.main(["check", "--data-dir", str(tmp_path / "data")]) == 1
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
        out = tmp_path / "out"
        argv = with_flags(
            train_args(env, out), ["--data-dir", str(tmp_path / "data"), "--task", task]
        )
        assert promot.main(argv) == 2
        err = capsys.readouterr().err
    finally:
        data.TASKS.pop(task, None)  # other tests list the registry
    one_line_error(err, "promot.py: error:")
    assert all(w in err for w in words), err
    assert not out.exists()


# --- issue 24: reads stay inside the folders named on the command line ------------------------


def test_a_split_name_that_leaves_the_task_folder_is_refused_before_anything_is_read(
    env, tmp_path, capsys
):
    import shutil

    data_dir = copy_data(env, tmp_path / "data")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text('{"input": "SECRET", "target": "x"}\n')
    shutil.copytree(tmp_path / "data" / "toy_copy", tmp_path / "data" / "leaky")  # a new name:
    spec = tmp_path / "data" / "leaky" / "task.json"  # the registry keeps a name's first task.json
    settings = {**json.loads(spec.read_text()), "eval_split": "../../outside/secret"}
    spec.write_text(json.dumps(settings))
    out = tmp_path / "r.json"
    argv = with_flags(evaluate_args(env, out), ["--data-dir", data_dir, "--eval-tasks", "leaky"])
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"evaluate.py: error: {spec}: eval_split is")
    assert "SECRET" not in err and not out.exists()
    assert data_main_show(data_dir, "leaky") == 2
    assert "SECRET" not in capsys.readouterr().out
    assert data_main_show(data_dir, "toy_tf", "--split", "../toy_copy/train") == 2
    one_line_error(capsys.readouterr().err, "data.py: error: task toy_tf")


def data_main_show(data_dir, task, *extra):
    import data

    return data.main(["show", "--data-dir", data_dir, "--task", task, *extra])


@pytest.mark.parametrize("link", ["toy_tf/train.jsonl", "toy_tf"])
def test_a_data_link_that_leaves_the_data_folder_is_refused(env, tmp_path, capsys, link):
    data_dir = copy_data(env, tmp_path / "data")
    inside = tmp_path / "data" / link
    os.rename(inside, tmp_path / "outside")
    os.symlink(tmp_path / "outside", inside)
    out = tmp_path / "out"
    assert promot.main(with_flags(train_args(env, out), ["--data-dir", data_dir])) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"promot.py: error: --data-dir {data_dir}:")
    assert "outside the folder" in err and not out.exists()


def copy_model(env, folder):
    import shutil

    shutil.copytree(env["model"], folder)
    return str(folder)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_weights_link_that_leaves_the_model_folder_is_refused(env, tmp_path, capsys, sharded):
    model = copy_model(env, tmp_path / "model")
    name = "model-00001-of-00001.safetensors" if sharded else "model.safetensors"
    os.rename(os.path.join(model, "model.safetensors"), tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", os.path.join(model, name))
    if sharded:  # the index names a file of the folder; the file is a link out of it
        index = os.path.join(model, "model.safetensors.index.json")
        json.dump({"weight_map": {"shared.weight": name}}, open(index, "w"))
    out = tmp_path / "r.json"
    assert evaluate.main(with_flags(evaluate_args(env, out), ["--model", model])) == 2
    one_line_error(capsys.readouterr().err, f"evaluate.py: error: --model {model}: {model}/{name}")
    assert promot.main(with_flags(train_args(env, tmp_path / "out"), ["--model", model])) == 2
    assert "outside the folder" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out").exists()


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path):
    import checks

    repo = tmp_path / "models--t5"  # the hub cache: snapshots/<hash>/ links into blobs/
    snapshot, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "f00d").write_text("{}")
    os.symlink("../../blobs/f00d", snapshot / "config.json")
    checks.check_model_folder(str(snapshot))  # the cache's own layout: accepted
    os.symlink(tmp_path, snapshot / "model.safetensors")
    with pytest.raises(BadInput, match="model.safetensors is a link to .* outside the folder"):
        checks.check_model_folder(str(snapshot))


# --- issue 24: memory that config.json or a flag asks for, refused before it is allocated ------


@pytest.mark.parametrize(
    "key,value",
    [(key, 10**12) for key in ("num_decoder_layers", "num_layers", "d_ff", "vocab_size")],
)
def test_a_config_json_that_asks_for_more_memory_than_the_machine_has_is_refused(
    env, tmp_path, capsys, key, value
):
    model = copy_model(env, tmp_path / "model")
    config = json.load(open(os.path.join(model, "config.json")))
    json.dump({**config, key: value}, open(os.path.join(model, "config.json"), "w"))
    out, r = tmp_path / "out", tmp_path / "r.json"
    assert promot.main(with_flags(train_args(env, out), ["--model", model])) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"promot.py: error: {model}/config.json's weights: needs at least")
    assert "more than the" in err and not out.exists()
    assert evaluate.main(with_flags(evaluate_args(env, r), ["--model", model])) == 2
    one_line_error(capsys.readouterr().err, f"evaluate.py: error: {model}/config.json's weights")
    assert not r.exists()


@pytest.mark.parametrize(
    "config",
    [
        dict(feed_forward_proj="relu", tie_word_embeddings=True, model_type="t5"),
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, model_type="mt5"),
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, model_type="umt5"),
    ],
)
def test_the_parameter_estimate_is_the_built_models_count(config):
    import checks

    sizes = dict(vocab_size=37, d_model=24, d_kv=5, d_ff=40, num_layers=3, num_decoder_layers=2)
    c = model_lib.T5Config(num_heads=3, **sizes, **config)
    built = sum(p.numel() for p in model_lib.build(c, "meta").parameters())
    assert checks.model_parameters(c) == built


# --- issue 24: checkpoints that count, resume fingerprints, checks before the first write ---


def _damage_model(env, tmp_path, how):
    """A copy of the test checkpoint, damaged as `how` says; returns its folder."""
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(env["model"], bad)
    weights, config = bad / "model.safetensors", bad / "config.json"
    if how == "zero-byte safetensors":
        weights.write_bytes(b"")
    elif how == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "missing shard":
        index = {"weight_map": {"shared.weight": "model-00002-of-00002.safetensors"}}
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
        weights.unlink()
    elif how.startswith("config "):
        config.write_text(how[len("config ") :])
    elif how == "num_heads 0":
        spec = json.loads(config.read_text())
        config.write_text(json.dumps({**spec, "num_heads": 0}))
    else:  # a pytorch_model.bin: a pickle of another object, or empty
        weights.unlink()
        payload = pickle.dumps(Payload(str(tmp_path / "pwned"))) if "pickle" in how else b""
        (bad / "pytorch_model.bin").write_bytes(payload)
    return str(bad)


MODEL_BAD = [  # (how the model folder is damaged, words the one line must hold)
    ("zero-byte safetensors", "model.safetensors: not a complete safetensors file (0 bytes"),
    ("truncated safetensors", "model.safetensors: not a complete safetensors file"),
    ("missing shard", "model-00002-of-00002.safetensors: listed in the checkpoint index"),
    ("num_heads 0", "config.json: num_heads is 0; expected an integer >= 1"),
    ("config 5", "config.json: expected a JSON object, got int"),
    ("config null", "config.json: expected a JSON object, got NoneType"),
    ('config "t5"', "config.json: expected a JSON object, got str"),
    ("config " + "[" * 100000, "config.json: not valid JSON"),
    ("pickle pytorch_model.bin", "pytorch_model.bin: refused to load"),
    ("zero-byte pytorch_model.bin", "pytorch_model.bin: refused to load"),
]


@pytest.mark.parametrize("how,words", MODEL_BAD, ids=[h[:30] for h, _ in MODEL_BAD])
def test_a_damaged_model_folder_is_one_line_before_anything_is_written(
    env, tmp_path, capsys, how, words
):
    model = _damage_model(env, tmp_path, how)
    argv = with_flags(train_args(env, tmp_path / "out"), ["--model", model])
    assert promot.main(argv) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    assert words in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def _checkpoints(out):
    return sorted(os.listdir(out / "stage1" / "checkpoints"))


def test_an_incomplete_newest_checkpoint_is_named_skipped_and_never_kept_over_good_ones(
    env, tmp_path, capsys
):
    """The issue's case: run to step 4, delete the newest checkpoint's trainer.json, --resume."""
    out = tmp_path / "out"
    argv = train_args(env, out, "--keep-checkpoints", "2", steps=6, save_every=2)
    assert promot.main(argv + ["--stop-after-step", "4"]) == 0
    os.remove(out / "stage1" / "checkpoints" / "step_0000004" / "trainer.json")
    capsys.readouterr()
    assert promot.main(argv + ["--resume", "--stop-after-step", "3"]) == 0
    printed = capsys.readouterr().out
    assert "step_0000004: incomplete checkpoint (no trainer.json); skipped" in printed
    assert "resumed from" in printed and "step_0000002 (step 2)" in printed
    # pruning kept the good step 2 and the new step 3, not the damaged step 4 over them
    assert _checkpoints(out) == ["step_0000002", "step_0000003", "step_0000004"]
    assert promot.main(argv + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _checkpoints(out) == ["step_0000004", "step_0000006"]
    assert not run_checkpoints.incomplete(str(out / "stage1" / "checkpoints" / "step_0000004"))


def test_resume_with_only_an_incomplete_checkpoint_is_one_line_and_deletes_nothing(
    env, tmp_path, capsys
):
    out = tmp_path / "out"
    assert promot.main(train_args(env, out, "--stop-after-step", "1")) == 0
    os.remove(out / "stage1" / "checkpoints" / "step_0000001" / "trainer.json")
    capsys.readouterr()
    assert promot.main(train_args(env, out, "--resume")) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    assert "incomplete checkpoint (no trainer.json); no complete checkpoint is left" in err
    assert _checkpoints(out) == ["step_0000001"]


@pytest.mark.parametrize("swap", ["tensors and json", "whole folder"])
def test_a_checkpoint_holding_another_steps_files_is_caught(env, tmp_path, capsys, swap):
    import shutil

    out = tmp_path / "out"
    argv = train_args(env, out, "--keep-checkpoints", "2", steps=3)
    assert promot.main(argv + ["--stop-after-step", "2"]) == 0
    one, two = (out / "stage1" / "checkpoints" / f"step_000000{i}" for i in (1, 2))
    if swap == "whole folder":
        shutil.rmtree(two)
        shutil.copytree(one, two)
    else:
        for name in ("rank0.safetensors", "rank0.json"):
            shutil.copy(one / name, two / name)
    capsys.readouterr()
    assert promot.main(argv + ["--resume"]) == 0  # from step 1, naming step 2
    printed = capsys.readouterr().out
    assert "step_0000002: incomplete checkpoint" in printed and "(step 1)" in printed


@pytest.mark.parametrize(
    "change,words",
    [
        ("template", "the data changed since stage1 started (toy_tf task: template"),
        ("label words", "the data changed since stage1 started (toy_tf task: template"),
        ("config.json", "the model files changed since stage1 started (config.json: sha256"),
        ("weights touched", "the model files changed since stage1 started (model.safetensors:"),
    ],
)
def test_resume_refuses_a_changed_task_or_model_in_one_line(env, tmp_path, capsys, change, words):
    import shutil

    import data

    model, data_dir = tmp_path / "model", copy_data(env, tmp_path / "data")
    shutil.copytree(env["model"], model)
    task = f"toy_tf_{change.replace(' ', '_').replace('.', '_')}"  # the registry keeps a name
    shutil.copytree(tmp_path / "data" / "toy_tf", tmp_path / "data" / task)
    flags = ["--model", str(model), "--data-dir", data_dir, "--task", task]
    argv = with_flags(train_args(env, tmp_path / "out", steps=2), flags)
    try:
        assert promot.main(argv + ["--stop-after-step", "1"]) == 0
        spec_path = tmp_path / "data" / task / "task.json"
        spec = json.loads(spec_path.read_text())
        if change == "template":
            spec["template"] = "Q: {input} Answer:"
        elif change == "label words":
            spec["label_words"] = ["False", "True"]
        spec_path.write_text(json.dumps(spec))
        if change == "config.json":
            config = json.loads((model / "config.json").read_text())
            (model / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.2}))
        elif change == "weights touched":
            os.utime(model / "model.safetensors", (1, 1))
        data.TASKS.pop(task, None)
        capsys.readouterr()
        assert promot.main(argv + ["--resume"]) == 2
        err = capsys.readouterr().err
        one_line_error(err, "promot.py: error: --resume:")
        assert words.replace("toy_tf", task) in err, err
        allow = "--allow-change " + ("model" if "model" in words else "data")
        assert allow in err
        data.TASKS.pop(task, None)
        assert promot.main(argv + ["--resume", *allow.split()]) == 0
    finally:
        data.TASKS.pop(task, None)


@pytest.mark.parametrize(
    "name,content,words",
    [
        ("config.json", "{", "config.json: unreadable, expected a promot run's settings"),
        ("config.json", "[1]", "config.json: expected a promot run's settings"),
        ("config.json", '{"stage1": 5}', "stage1 is not an object of settings"),
        ("stage1/best.json", "{}", "best.json: expected the best step's record"),
        ("stage1/checkpoints/step_0000001/trainer.json", "{", "no complete checkpoint"),
    ],
)
def test_a_corrupt_run_folder_file_is_one_line(env, tmp_path, capsys, name, content, words):
    out = tmp_path / "out"
    assert promot.main(train_args(env, out, "--stop-after-step", "1")) == 0
    (out / name).write_text(content)
    capsys.readouterr()
    assert promot.main(train_args(env, out, "--resume")) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    assert words in err, err


def test_ctrl_c_before_training_is_one_line(env, tmp_path, capsys, monkeypatch):
    import data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "register_tasks", interrupted)
    assert promot.main(train_args(env, tmp_path / "out")) == 130
    one_line_error(capsys.readouterr().err, "promot.py: interrupted (Ctrl-C)")


def test_a_failed_export_names_the_folder_and_the_intact_checkpoint(
    env, tmp_path, capsys, monkeypatch
):
    from safetensors import SafetensorError

    from support import prompt_formats

    def fails(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(prompt_formats, "export_prompts", fails)
    assert promot.main(train_args(env, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error: cannot write")
    assert "stage1/final (Error while serializing" in err and "step_0000002 is intact" in err


def test_hash_weights_compares_contents_so_a_touched_file_resumes(env, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    argv = with_flags(train_args(env, tmp_path / "out", "--hash-weights"), ["--model", str(model)])
    assert promot.main(argv + ["--stop-after-step", "1"]) == 0
    os.utime(model / "model.safetensors", (1, 1))  # the same bytes: a copy, a restore
    assert promot.main(argv + ["--resume"]) == 0
    record = json.load(open(tmp_path / "out" / "config.json"))["stage1"]["model_files"]
    assert record["model.safetensors"].startswith("sha256 ")
