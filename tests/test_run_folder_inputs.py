"""Hostile inputs, round 4 (issue 29): what a run folder holds is input too (links, hand-edited
JSON), a moved run resumes, the lock survives a failed write, shards hold each tensor once,
evaluate.py's inputs are never its output, names and sizes are bounded, and every unknown task
is named at once. Each: one line and exit 2 (or a clean fallback), nothing written outside
--out, no checkpoint lost."""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_inputs import (
    copy_model,
    evaluate_args,
    folder_state,
    one_line_error,
    train_args,
    with_flags,
)

import checks
import diagnostics
import evaluate
import promot
import promot_fixtures as pf
from support import prompt_formats, run_checkpoints

SCORED = ["--eval-examples", "2", "--num-beams", "1", "--max-new-tokens", "3"]


def args(env, out, *extra, scored=False, **kwargs):
    """test_bad_inputs' training flags; `scored`: checkpoints are scored (best.json)."""
    argv = train_args(env, out, *extra, **kwargs)
    return [a for a in argv if a != "--no-eval"] + SCORED if scored else argv


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """test_bad_inputs' fixtures: the tiny checkpoint and the two toy tasks."""
    d = tmp_path_factory.mktemp("run_folder")
    model = pf.make_model_dir(str(d / "model"), pf.make_spiece(str(d / "spiece")))
    return dict(model=model, data=pf.make_data_dir(str(d / "data")), root=d)


def stopped_run(env, out, scored=False):
    """A stage-1 run stopped after step 1 (a checkpoint, log.jsonl; best.json when `scored`)."""
    assert promot.main(args(env, out, "--stop-after-step", "1", scored=scored)) == 0
    return out


def resume_refused(env, out, capsys, *words, scored=False):
    capsys.readouterr()
    assert promot.main(args(env, out, "--resume", scored=scored)) == 2
    err = capsys.readouterr().err
    one_line_error(err, "promot.py: error:")
    for w in words:
        assert w in err, err
    return err


# --- 1. a run folder's own files are input: links, checksums, schemas -----------------------


@pytest.mark.parametrize(
    "name", ["log.jsonl", "config.json", "stage1/best.json", "stage1/checkpoints", ".lock"]
)
def test_a_link_in_a_run_folder_is_refused_and_nothing_is_written_through_it(
    env, tmp_path, capsys, name
):
    out = stopped_run(env, tmp_path / "out", scored=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    if (out / name).is_dir():
        shutil.copytree(out / name, victim)
        shutil.rmtree(out / name)
    else:
        victim.write_bytes((out / name).read_bytes() if (out / name).exists() else b"x")
        (out / name).unlink(missing_ok=True)
    os.symlink(victim, out / name)
    before = folder_state(outside)
    resume_refused(env, out, capsys, f"{out / name} is a link (to {victim})")
    assert folder_state(outside) == before  # an append to log.jsonl would have gone there


def test_an_export_never_copies_through_a_link(env, tmp_path, capsys):
    """A finished stage 1 resumed exports final/ again: a link in final/ to a folder outside
    would be copied into the run (a link to / without end)."""
    out = tmp_path / "out"
    assert promot.main(train_args(env, out)) == 0
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "data.txt").write_text("not the run's")
    os.symlink(outside, out / "stage1" / "final" / "elsewhere")
    resume_refused(env, out, capsys, "final/elsewhere is a link")
    assert not any("data.txt" in files for _, _, files in os.walk(out))


def _edit_trainer(out, change, step=1):
    path = out / "stage1" / "checkpoints" / f"step_{step:07d}" / "trainer.json"
    trainer = json.loads(path.read_text())
    path.write_text(json.dumps(change(trainer), indent=3))


def test_an_edited_trainer_json_is_caught_by_its_checksum(env, tmp_path, capsys):
    out = stopped_run(env, tmp_path / "out")
    _edit_trainer(out, lambda t: {**t, "data_position": {**t["data_position"], "draws": 3}})
    resume_refused(env, out, capsys, "trainer.json: SHA-256 mismatch", "no complete checkpoint")
    assert os.listdir(out / "stage1" / "checkpoints") == ["step_0000001"]  # nothing deleted
    _edit_trainer(out, lambda t: {k: v for k, v in t.items() if k != "data_position"})
    resume_refused(env, out, capsys, "trainer.json: SHA-256 mismatch")  # not a KeyError


def test_an_edited_newest_trainer_json_falls_back_to_the_older_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_args(env, out, "--keep-checkpoints", "2", steps=3)
    assert promot.main(argv + ["--stop-after-step", "2"]) == 0
    past_the_end = {"toy_tf": [0, 10**6]}
    _edit_trainer(out, lambda t: {**t, "data_position": {**t["data_position"], **past_the_end}}, 2)
    capsys.readouterr()
    assert promot.main(argv + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "step_0000002: incomplete checkpoint (trainer.json: SHA-256 mismatch" in printed
    assert "(step 1)" in printed


def test_a_re_indented_trainer_json_still_resumes(env, tmp_path, capsys):
    """The checksum is of the JSON's values (sorted keys), not of its bytes."""
    out = stopped_run(env, tmp_path / "out")
    _edit_trainer(out, lambda t: dict(reversed(list(t.items()))))
    assert promot.main(train_args(env, out, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change,sealed,words",
    [  # sealed: the edit carries a recomputed checksum, so the schema must catch it
        ({"score": "high"}, True, "score 'high': expected an integer step and a finite score"),
        ({"score": float("nan")}, True, "score nan"),
        ({"evaluated": "1"}, True, "evaluated '1': expected a list of steps"),
        ({"score": 99.0}, False, "SHA-256 mismatch"),  # valid JSON, not what promot wrote
    ],
)
def test_an_edited_best_json_is_one_line_before_any_export(
    env, tmp_path, capsys, change, sealed, words
):
    out = stopped_run(env, tmp_path / "out", scored=True)
    best = out / "stage1" / "best.json"
    record = {**json.loads(best.read_text()), **change}
    best.write_text(json.dumps(run_checkpoints.seal(record) if sealed else record))
    resume_refused(env, out, capsys, "best.json: ", words, scored=True)
    assert not (out / "stage1" / "final").exists()  # refused before the export ran


def test_a_re_indented_best_json_still_resumes(env, tmp_path, capsys):
    out = stopped_run(env, tmp_path / "out", scored=True)
    best = out / "stage1" / "best.json"
    best.write_text(json.dumps(json.loads(best.read_text()), indent=6, sort_keys=True))
    assert promot.main(args(env, out, "--resume", scored=True)) == 0


# --- 2. a run folder is relocatable --------------------------------------------------------


def test_a_moved_run_folder_resumes_stage_2_to_the_same_final_weights(env, tmp_path):
    """Stage 2 records stage 1's prompt by its place in the run folder, so the moved copy
    resumes (it was refused: "--prompt: saved '.../old/...', now '.../new/...'")."""
    out = tmp_path / "old"
    assert promot.main(train_args(env, out)) == 0
    stage2 = ["--stop-after-step", "1"]
    assert promot.main(train_args(env, out, *stage2, stage="2")) == 0
    shutil.copytree(out, tmp_path / "copy")
    os.rename(tmp_path / "copy", tmp_path / "moved")  # a copy, then moved: nothing of old/
    for run in (out, tmp_path / "moved"):
        assert promot.main(train_args(env, run, "--resume", stage="2")) == 0
    unmoved = load_file(out / "stage2" / "final" / "model.safetensors")
    moved = load_file(tmp_path / "moved" / "stage2" / "final" / "model.safetensors")
    assert unmoved.keys() == moved.keys()
    assert all(torch.equal(unmoved[k], moved[k]) for k in unmoved)


# --- 3. the lock survives a failed write ---------------------------------------------------


def test_an_empty_lock_left_by_a_failed_write_is_taken_over_with_one_line(env, tmp_path, capsys):
    out = stopped_run(env, tmp_path / "out")
    (out / ".lock").write_bytes(b"")  # what a full disk left
    os.utime(out / ".lock", (1, 1))
    capsys.readouterr()
    assert promot.main(train_args(env, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "empty or unreadable and no run holds it; taken over" in err
    assert not (out / ".lock").exists()


def test_a_lock_that_cannot_be_written_is_not_left_behind(env, tmp_path, capsys, monkeypatch):
    out = stopped_run(env, tmp_path / "out")
    real = run_checkpoints.json.dump

    def full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and set(obj) == {"pid", "host"}:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(run_checkpoints.json, "dump", full)
    resume_refused(env, out, capsys, "cannot write its lock", "No space left on device")
    assert not (out / ".lock").exists()


# --- 4. checkpoints are unambiguous --------------------------------------------------------


def _sharded(env, folder):
    """The test checkpoint as two shards and an index; returns (folder, shard files, weight map)."""
    model = copy_model(env, folder)
    tensors = load_file(os.path.join(model, "model.safetensors"))
    os.remove(os.path.join(model, "model.safetensors"))
    names = sorted(tensors)
    files = [os.path.join(model, f"model-0000{i}-of-00002.safetensors") for i in (1, 2)]
    weight_map = {n: files[0] if i < 5 else files[1] for i, n in enumerate(names)}
    for file in files:
        save_file({n: tensors[n] for n in names if weight_map[n] == file}, file)
    index = {"weight_map": {n: os.path.basename(f) for n, f in weight_map.items()}}
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return model, files, weight_map


def test_a_zeroed_copy_in_the_shard_the_index_does_not_name_is_refused_by_every_command(
    env, tmp_path, capsys
):
    """The index maps a tensor to shard 2; shard 1 also holds a zeroed copy, which a loader that
    meets it first keeps: every score 0.00, without a word. Refused before loading, naming both
    files."""
    model, files, weight_map = _sharded(env, tmp_path / "model")
    name = next(n for n, f in weight_map.items() if f == files[1])
    save_file({**load_file(files[0]), name: torch.zeros_like(load_file(files[1])[name])}, files[0])
    out = tmp_path / "r.json"
    assert evaluate.main(with_flags(evaluate_args(env, out), ["--model", model])) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"evaluate.py: error: {files[0]}: holds tensor {name!r}, but ")
    assert f"maps it to {files[1]}" in err
    assert promot.main(with_flags(train_args(env, tmp_path / "out"), ["--model", model])) == 2
    one_line_error(capsys.readouterr().err, f"promot.py: error: {files[0]}: holds tensor")
    assert not out.exists() and not (tmp_path / "out").exists()


def _expected_shapes(model):
    import model as model_lib

    meta = model_lib.build(model_lib.read_config(model))
    return {model_lib.ours_to_hf(n): p.shape for n, p in meta.named_parameters()}


@pytest.mark.parametrize("how", ["in both shards", "not in the index"])
def test_a_tensor_in_two_shards_or_missing_from_the_index_is_refused(env, tmp_path, how):
    model, files, weight_map = _sharded(env, tmp_path / "model")
    name = next(n for n, f in weight_map.items() if f == files[0])
    if how == "in both shards":  # the index names shard 1; shard 2 holds a copy too
        save_file({**load_file(files[1]), name: load_file(files[0])[name]}, files[1])
        words = f"{files[0]} and {files[1]} both hold tensor {name!r}"
    else:
        del weight_map[name]
        words = f"{files[0]}: holds tensor {name!r}, but .*index.json does not name it"
    with pytest.raises(checks.DamagedFile, match=words):
        checks.check_weight_files(model, _expected_shapes(model), files, weight_map)


# --- 5. evaluate.py: --out is never an input, tasks once, a prompt has rows, ids fit -------


def test_evaluate_refuses_its_inputs_as_out_duplicate_tasks_and_an_empty_prompt(
    env, tmp_path, capsys
):
    baseline = tmp_path / "baseline.json"
    assert evaluate.main(evaluate_args(env, baseline)) == 0
    empty = tmp_path / "empty.safetensors"
    save_file({"prompt.toy_tf": torch.zeros(0, 32)}, str(empty))
    kept = baseline.read_bytes()
    cases = [
        (["--baseline", str(baseline)], str(baseline), "is --baseline"),
        (["--baseline", str(baseline)], f"{tmp_path}/x/../baseline.json", "is --baseline"),
        (["--eval-tasks", "toy_copy,toy_tf,toy_copy"], None, "names toy_copy more than once"),
        (["--prompt", str(empty)], None, "prompt 'prompt.toy_tf' has 0 rows"),
    ]
    for flags, out, words in cases:
        out = out or str(tmp_path / "r.json")
        capsys.readouterr()
        assert evaluate.main(with_flags(evaluate_args(env, out), flags)) == 2, flags
        err = capsys.readouterr().err
        one_line_error(err, "evaluate.py: error:")
        assert words in err, err
        assert not (tmp_path / "r.json").exists() and baseline.read_bytes() == kept


@pytest.mark.parametrize(
    "key,value", [("decoder_start_token_id", 140), ("pad_token_id", 1000), ("eos_token_id", 140)]
)
def test_config_ids_beyond_the_vocabulary_are_refused_before_scoring(
    env, tmp_path, capsys, key, value
):
    model = copy_model(env, tmp_path / "model")
    config = json.load(open(os.path.join(model, "config.json")))
    json.dump({**config, key: value}, open(os.path.join(model, "config.json"), "w"))
    out = tmp_path / "r.json"
    assert evaluate.main(with_flags(evaluate_args(env, out), ["--model", model])) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"evaluate.py: error: {model}/config.json: {key} is {value}; expected")
    assert "below vocab_size 140" in err and not out.exists()


# --- 6. names and sizes ---------------------------------------------------------------------


def test_a_task_name_too_long_for_a_file_system_is_one_line_in_every_command(env, tmp_path, capsys):
    import data

    name = "a" * 300  # OSError: File name too long, before
    assert promot.main(train_args(env, tmp_path / "out", "--task", name)) == 2
    one_line_error(capsys.readouterr().err, "promot.py: error: task name aaaa")
    for flag in ("--task", "--eval-tasks"):
        argv = with_flags(evaluate_args(env, tmp_path / "r.json"), [flag, name])
        assert evaluate.main(argv) == 2
        one_line_error(capsys.readouterr().err, "evaluate.py: error: task name aaaa")
    assert data.main(["show", "--data-dir", env["data"], "--task", name]) == 2
    err = capsys.readouterr().err
    one_line_error(err, "data.py: error: task name aaaa")
    assert "(300 characters): expected at most 100" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_twenty_thousand_one_wide_layers_are_refused_before_the_model_is_built(
    env, tmp_path, capsys
):
    model = copy_model(env, tmp_path / "model")
    config = json.load(open(os.path.join(model, "config.json")))
    tiny = dict(d_model=1, d_kv=1, d_ff=1, num_heads=1, num_layers=20000, num_decoder_layers=1)
    json.dump({**config, **tiny}, open(os.path.join(model, "config.json"), "w"))
    assert checks.model_parameters(model_config(model)) < 2**20  # the memory estimate passes
    assert promot.main(with_flags(train_args(env, tmp_path / "out"), ["--model", model])) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"promot.py: error: {model}/config.json: num_layers is 20000")
    assert "expected at most 1000" in err
    assert evaluate.main(with_flags(evaluate_args(env, tmp_path / "r"), ["--model", model])) == 2
    assert "num_layers is 20000" in capsys.readouterr().err


def model_config(model):
    import model as model_lib

    return model_lib.read_config(model)


@pytest.mark.parametrize("value", ["5", 2.5, -1, 0, True])
def test_a_peft_adapter_config_of_the_wrong_types_is_one_line(env, tmp_path, capsys, value):
    folder = tmp_path / "adapter"
    prompt_formats.write_peft_adapter(folder, torch.randn(5, 32), env["model"])
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": value}))
    to = tmp_path / "prompt.safetensors"
    assert prompt_formats.main(["import", str(folder), "--to", str(to), "--task", "toy_tf"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"num_virtual_tokens is {value!r}; expected an integer" in err
    assert not to.exists()


@pytest.mark.parametrize(
    "record,words",
    [
        ({"stage": "stage2", "step": 2}, "\"kind\" is 'None'; expected one of probe"),
        ({"kind": "probe", "stage": "s", "task": "t", "shots": 0, "score": 1}, "'step' is missing"),
        (
            {"kind": "probe", "stage": "s", "step": 2, "task": "t", "shots": 0, "score": "x"},
            "score",
        ),
        ({"kind": "alignment", "stage": "s", "step": 2, "cosines": [1]}, "'cosines' is [1]"),
    ],
)
def test_diagnostics_plot_checks_its_records_like_results_files(tmp_path, capsys, record, words):
    (tmp_path / "diagnostics.jsonl").write_text(json.dumps(record) + "\n")
    assert diagnostics.main(["plot", str(tmp_path), "--out", str(tmp_path / "figures")]) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"diagnostics.py: error: {tmp_path}/diagnostics.jsonl:1: ")
    assert words in err and not (tmp_path / "figures").exists()


# --- 7. every missing task at once ----------------------------------------------------------


def test_every_unknown_or_missing_task_is_named_in_one_line_with_the_eval_tasks_that_run(
    env, tmp_path, capsys
):
    """Names no suite registers (lab/tasks.py registers lab_* when a test imports it)."""
    out = tmp_path / "r.json"
    argv = with_flags(evaluate_args(env, out), ["--eval-tasks", "zz_who,toy_copy,rte,zz_why"])
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    one_line_error(err, "evaluate.py: error: unknown tasks 'zz_who', 'zz_why'; known tasks: ")
    assert "has no folder for 1 evaluation task of 4: rte" in err
    assert "score the others with --eval-tasks toy_copy, or pass --skip-missing-tasks" in err
    argv = with_flags(argv, ["--eval-tasks", "zz_who,toy_copy", "--skip-missing-tasks", "x"])
    argv.remove("x")
    assert evaluate.main(argv) == 2  # an unknown name is not a missing folder to skip
    assert "unknown task 'zz_who'" in capsys.readouterr().err
    argv = train_args(env, tmp_path / "out", "--task", "zz_who,zz_what,toy_tf")
    assert promot.main(argv) == 2
    one_line_error(capsys.readouterr().err, "promot.py: error: unknown tasks 'zz_who', 'zz_what'")
    assert not out.exists() and not (tmp_path / "out").exists()


def test_a_mixture_position_past_a_shrunk_task_starts_its_next_epoch():
    """--allow-change data after the train split shrank below the saved position: the task's
    next epoch begins (no IndexError); a forged position is one BadInput."""
    from support.errors import BadInput
    from support.mixture import Mixture

    mixture = Mixture({"a": list(range(3))}, seed=0)
    mixture.load_state_dict({"seed": 0, "draws": 7, "positions": {"a": [2, 9]}})
    assert mixture.positions == {"a": [3, 0]} and next(mixture)[1] in range(3)
    for bad in (None, {"seed": 0, "draws": -1, "positions": {"a": [0, 0]}}, {"seed": 0}):
        with pytest.raises(BadInput):
            Mixture({"a": [1]}, seed=0).load_state_dict(bad)
