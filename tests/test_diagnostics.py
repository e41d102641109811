"""The paper's §3 diagnostics: gradient alignment, probes, figures."""

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from promot_fixtures import make_data_dir, make_model_dir, make_spiece

import data
import diagnostics
import model
from support import t5x_loss
from support.errors import BadInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    spiece = make_spiece(str(root / "spm"))
    model_dir = make_model_dir(str(root / "model"), spiece)
    data_dir = make_data_dir(str(root / "data"))
    data.register_tasks(["toy_tf", "toy_copy"], data_dir)  # as a command does up front
    tokenizer = data.Tokenizer(spiece)
    examples = data.load_split(data.get_task("toy_tf", data_dir), data_dir, "train")
    return dict(model_dir=model_dir, data_dir=data_dir, tokenizer=tokenizer, examples=examples)


def test_identical_batches_have_cosine_one(lab):
    t5 = model.load_pretrained(lab["model_dir"])
    batch, _ = diagnostics.alignment_batches("toy_tf", lab["examples"], lab["tokenizer"], 8, seed=0)
    cos = diagnostics.gradient_alignment(t5, batch, batch)
    assert set(cos) == {
        "mlp",
        "self_attn.q",
        "self_attn.k",
        "self_attn.v",
        "cross_attn.q",
        "cross_attn.k",
        "cross_attn.v",
        "model",
    }
    for group, value in cos.items():
        assert value == pytest.approx(1.0, abs=1e-9), group


def test_cosine_matches_a_direct_computation(lab):
    t5 = model.load_pretrained(lab["model_dir"]).eval()
    for seed in range(100):  # a batch whose shuffle moves a label (the toy task is mostly False)
        batch, shuffled = diagnostics.alignment_batches(
            "toy_tf", lab["examples"], lab["tokenizer"], 8, seed=seed
        )
        if not torch.equal(batch["labels"], shuffled["labels"]):
            break
    assert not torch.equal(batch["labels"], shuffled["labels"])
    assert torch.equal(batch["input_ids"], shuffled["input_ids"])  # on the same inputs
    params = [p for _, p in t5.named_parameters()]

    def flat_grad(b):
        total, count = t5x_loss.cross_entropy(
            t5(b["input_ids"], b["attention_mask"], model.shift_right(b["labels"])), b["labels"]
        )
        return torch.autograd.grad(total / count, params)

    g, h = flat_grad(batch), flat_grad(shuffled)
    whole = torch.nn.functional.cosine_similarity(
        torch.cat([x.flatten() for x in g]).double(),
        torch.cat([x.flatten() for x in h]).double(),
        dim=0,
    )
    names = [n for n, _ in t5.named_parameters()]
    q = names.index("decoder.blocks.1.self_attn.q.weight")
    q_cos = torch.nn.functional.cosine_similarity(
        g[q].flatten().double(), h[q].flatten().double(), dim=0
    )
    cos = diagnostics.gradient_alignment(t5, batch, shuffled)
    assert cos["model"] == pytest.approx(whole.item(), abs=1e-6)
    assert cos["self_attn.q"] == pytest.approx(q_cos.item(), abs=1e-6)
    assert all(p.grad is None for p in params)  # nothing left behind for the optimizer


def test_alignment_leaves_weights_grads_and_rng_alone(lab):
    t5 = model.load_pretrained(lab["model_dir"]).train()
    before = {n: p.detach().clone() for n, p in t5.named_parameters()}
    flags = diagnostics.TrainingFlags(align_steps="0", align_batch_size=8)
    diag = diagnostics.TrainingDiagnostics(
        flags, str(lab["data_dir"]), "stage2", lab["tokenizer"], lab["data_dir"], "toy_tf"
    )
    state = torch.get_rng_state()
    records = diag.run(0, t5)
    assert records[0]["kind"] == "alignment" and records[0]["step"] == 0
    assert torch.equal(torch.get_rng_state(), state)
    assert t5.training
    for n, p in t5.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n


def test_probes_record_score_and_the_exact_format_ratio(lab, tmp_path):
    t5 = model.load_pretrained(lab["model_dir"])
    flags = diagnostics.TrainingFlags(
        probe_tasks="toy_copy", probe_every=5, probe_shots="0,1", probe_limit=6
    )
    diag = diagnostics.TrainingDiagnostics(
        flags, str(tmp_path), "finetune", lab["tokenizer"], lab["data_dir"], "toy_tf"
    )
    assert diag.due(10) == (True, False) and diag.due(7) == (False, False)
    records = diag.run(10, t5)
    assert [(r["task"], r["shots"], r["step"]) for r in records] == [
        ("toy_copy", 0, 10),
        ("toy_copy", 1, 10),
    ]
    # the ratio counts exactly the answers that are a label word of the fine-tuned task
    import evaluate

    result = evaluate.score_task(
        t5,
        lab["tokenizer"],
        "toy_copy",
        diag.probe_sets["toy_copy"][0],
        pool=diag.probe_sets["toy_copy"][1],
        shots=1,
        num_beams=1,
    )
    in_format = sum(
        evaluate.first_word(e["prediction"]) in ("True", "False") for e in result["examples"]
    )
    assert records[1]["format_ratio"] == pytest.approx(100.0 * in_format / len(result["examples"]))
    saved = [json.loads(line) for line in open(tmp_path / "diagnostics.jsonl")]
    assert saved == records


def test_a_failing_probe_is_logged_and_training_goes_on(lab, tmp_path, capsys):
    t5 = model.load_pretrained(lab["model_dir"])
    flags = diagnostics.TrainingFlags(probe_tasks="toy_copy", probe_every=1, probe_limit=2)
    diag = diagnostics.TrainingDiagnostics(
        flags, str(tmp_path), "finetune", lab["tokenizer"], lab["data_dir"], "toy_tf"
    )
    diag.probe_sets["toy_copy"] = ([], [])  # an empty task makes score_task raise
    records = diag.run(1, t5)
    assert records[0]["kind"] == "error" and "toy_copy" in records[0]["error"]
    assert "training continues" in capsys.readouterr().out
    diag.strict = True
    with pytest.raises(Exception):
        diag.run(1, t5)


def test_probe_task_missing_from_the_data_folder(lab, tmp_path):
    flags = diagnostics.TrainingFlags(probe_tasks="cb", probe_every=1)
    with pytest.raises(BadInput, match="--probe-tasks cb: not available in"):
        diagnostics.TrainingDiagnostics(
            flags, str(tmp_path), "finetune", lab["tokenizer"], lab["data_dir"], "toy_tf"
        )


def hook(lab, out, stage="finetune", tasks=("toy_tf",), **flags):
    cfg = types.SimpleNamespace(
        out=str(out), data_dir=lab["data_dir"], seed=0, num_beams=1, stage=stage
    )
    tasks = [data.get_task(name, lab["data_dir"]) for name in tasks]
    return diagnostics.training_hook(
        diagnostics.TrainingFlags(**flags), cfg, tasks, lab["tokenizer"], stage
    )


def test_the_training_hook_is_none_when_no_diagnostics_are_asked_for(lab, tmp_path):
    assert hook(lab, tmp_path) is None
    assert hook(lab, tmp_path, probe_tasks="toy_copy") is None  # probes without --probe-every


def test_the_training_hook_measures_exactly_the_steps_asked_for(lab, tmp_path):
    on_step = hook(
        lab,
        tmp_path,
        probe_every=2,
        probe_tasks="toy_copy",
        probe_shots="0",
        probe_limit=2,
        align_steps="1,every:3",
        align_batch_size=8,
    )
    t5 = model.load_pretrained(lab["model_dir"])
    for step in range(5):
        on_step(step, t5, {}, diagnostics.contextlib.nullcontext)
    records = [json.loads(line) for line in open(tmp_path / "diagnostics.jsonl")]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("probe", 0),
        ("alignment", 0),
        ("alignment", 1),
        ("probe", 2),
        ("alignment", 3),
        ("probe", 4),
    ]


@pytest.mark.parametrize(
    "stage, tasks, flags, message",
    [
        ("1", ("toy_tf",), dict(align_steps="0"), "stage 1 trains only the prompt"),
        ("finetune", ("toy_tf", "toy_copy"), dict(align_steps="every:2"), "needs a single --task"),
        ("finetune", ("toy_tf",), dict(probe_every=2), "--probe-every needs --probe-tasks"),
        (
            "finetune",
            ("toy_tf",),
            dict(align_steps="0,x"),
            "--align-steps '0,x': expected comma-separated integers",
        ),
        ("finetune", ("toy_tf",), dict(probe_limit=0), "--probe-limit 0: expected >= 1"),
    ],
)
def test_the_training_hook_refuses_flags_it_cannot_honour(
    lab, tmp_path, stage, tasks, flags, message
):
    with pytest.raises(BadInput, match=re.escape(message)):
        hook(lab, tmp_path, stage, tasks, **flags)


def test_label_shuffling_needs_a_classification_task(lab):
    examples = data.load_split(data.get_task("toy_copy", lab["data_dir"]), lab["data_dir"], "train")
    with pytest.raises(BadInput, match="toy_copy: label shuffling needs a classification task"):
        diagnostics.alignment_batches("toy_copy", examples, lab["tokenizer"], 8, seed=0)


def write_run(folder, stage, curve):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "diagnostics.jsonl"), "w") as f:
        for step, score, ratio in curve:
            f.write(
                json.dumps(
                    {
                        "kind": "probe",
                        "stage": stage,
                        "step": step,
                        "task": "toy_copy",
                        "shots": 1,
                        "metric": "exact_match",
                        "score": score,
                        "format_ratio": ratio,
                        "num_examples": 6,
                    }
                )
                + "\n"
            )
        for step, cos in ((0, 0.97), (4, 0.2)):
            f.write(
                json.dumps(
                    {
                        "kind": "alignment",
                        "stage": stage,
                        "step": step,
                        "task": "toy_tf",
                        "layer": -1,
                        "cosines": {"mlp": cos, "self_attn.q": cos / 2, "model": cos},
                    }
                )
                + "\n"
            )
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        for step, score, _ in curve:
            f.write(
                json.dumps({"stage": stage, "event": "eval", "step": step, "score": 50 + step})
                + "\n"
            )


def test_plot_writes_non_empty_pngs_and_csvs(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "ft", "finetune", [(0, 40.0, 5.0), (2, 10.0, 80.0), (4, 2.0, 99.0)])
    write_run(tmp_path / "promot", "stage2", [(0, 40.0, 5.0), (2, 38.0, 6.0), (4, 37.0, 4.0)])
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "diagnostics.py"),
            "plot",
            str(tmp_path / "ft"),
            str(tmp_path / "promot"),
            "--out",
            str(tmp_path / "fig"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for name in ("in_context.png", "format_ratio.png", "alignment.png", "tradeoff.png"):
        png = (tmp_path / "fig" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 2000, name
    rows = (tmp_path / "fig" / "tradeoff.csv").read_text().splitlines()
    assert rows[0] == "run,stage,step,finetuned_score,unseen_average" and len(rows) == 7


def curve_rows(task, scores, ratio=0.0, shared=""):
    """in_context rows of `tables` for one task, one run, steps 0, 50, 100..."""
    return [
        dict(
            run="ft",
            stage="finetune",
            step=50 * i,
            task=task,
            shots=1,
            score=score,
            metric="accuracy",
            format_ratio=ratio,
            format_words="True/False",
            shared_words=shared,
        )
        for i, score in enumerate(scores)
    ]


def test_every_in_context_and_format_ratio_panel_is_on_0_to_100():
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = curve_rows("lab_kind", [100.0, 96.9, 88.0]) + curve_rows("lab_news", [100.0, 45.0])
    figures = diagnostics.in_context_figures(plt, rows)
    assert sorted(figures) == ["format_ratio.png", "in_context.png"]
    for name, fig in figures.items():
        assert [ax.get_ylim() for ax in fig.axes] == [(0.0, 100.0), (0.0, 100.0)], name
        plt.close(fig)


def test_format_ratio_leaves_out_a_task_whose_answers_use_the_format_words():
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = curve_rows("lab_kind", [100.0, 90.0]) + curve_rows(
        "lab_lives", [81.0, 75.0], ratio=56.0, shared="False/True"
    )
    figures = diagnostics.in_context_figures(plt, rows)
    ratio, scores = figures["format_ratio.png"], figures["in_context.png"]
    assert [ax.get_title() for ax in ratio.axes] == ["lab_kind, 1-shot"]
    caption = " ".join(t.get_text() for t in ratio.texts)
    assert "Left out: lab_lives (its answers include False/True)" in caption
    assert "first word is one of the fine-tuned task's answers (True/False)" in caption
    # its score is still a score: the in-context figure keeps it
    assert [ax.get_title() for ax in scores.axes] == [
        "lab_kind, 1-shot (accuracy)",
        "lab_lives, 1-shot (accuracy)",
    ]
    plt.close("all")
    only_shared = diagnostics.in_context_figures(plt, curve_rows("x", [1.0], shared="True"))
    assert only_shared["format_ratio.png"] == (
        "every probed task's own answers use its words: x (its answers include True)"
    )
    plt.close("all")


def test_probe_records_name_the_answer_words_they_share_with_the_fine_tuned_task(lab, tmp_path):
    t5 = model.load_pretrained(lab["model_dir"])
    flags = diagnostics.TrainingFlags(
        probe_tasks="toy_tf,toy_copy", probe_every=1, probe_shots="0", probe_limit=2
    )
    diag = diagnostics.TrainingDiagnostics(
        flags, str(tmp_path), "finetune", lab["tokenizer"], lab["data_dir"], "toy_tf"
    )
    records = diag.run(0, t5)
    assert [(r["task"], r["format_words"], r["shared_words"]) for r in records] == [
        ("toy_tf", ["True", "False"], ["False", "True"]),
        ("toy_copy", ["True", "False"], []),
    ]


def test_the_tradeoff_figure_is_skipped_with_a_message_on_too_few_checkpoints(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "ft", "finetune", [(0, 40.0, 5.0), (4, 2.0, 99.0)])
    write_run(tmp_path / "promot", "stage2", [(4, 37.0, 4.0)])
    written = diagnostics.plot([str(tmp_path / "ft"), str(tmp_path / "promot")], str(tmp_path))
    assert str(tmp_path / "tradeoff.png") not in written
    assert str(tmp_path / "tradeoff.csv") in written  # the numbers are still written
    assert capsys.readouterr().out == (
        "skipped tradeoff.png: a trade-off needs a run with at least 3 checkpoints that were "
        "both scored on the validation split and probed at the same step (have ft (finetune): 2, "
        "promot (stage2): 1); save more checkpoints (--save-every) at steps the probes run "
        "(--probe-every)\n"
    )


def test_the_tradeoff_figure_with_three_checkpoints_has_both_axes_on_one_range_to_100():
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = [
        dict(run="ft", stage="finetune", step=s, finetuned_score=90 + s, unseen_average=95 - s)
        for s in (1, 2, 3)
    ]
    fig = diagnostics.tradeoff_figure(plt, rows)["tradeoff.png"]
    # lowest point 91 -> from 80 (a round number at least 5 below it) to 100
    assert (fig.axes[0].get_xlim(), fig.axes[0].get_ylim()) == ((80, 100), (80, 100))
    plt.close(fig)


def test_alignment_bars_are_sorted_labelled_and_captioned():
    plt = pytest.importorskip("matplotlib.pyplot")
    cosines = {"mlp": 0.3, "self_attn.q": 0.9, "cross_attn.k": -0.5, "model": 0.5}
    rows = [
        dict(run="ft", stage="finetune", step=step, group=g, cosine=c * scale)
        for step, scale in ((0, 1.0), (400, 0.5))
        for g, c in cosines.items()
    ]
    assert diagnostics.alignment_order(rows) == ["self_attn.q", "model", "mlp", "cross_attn.k"]
    fig = diagnostics.alignment_figure(plt, rows)["alignment.png"]
    ax = fig.axes[0]
    top_down = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))[::-1]
    labels = ["self-attention Q", "whole model", "MLP kernels", "cross-attention K"]
    assert [text for _, text in top_down] == labels
    assert sorted(t.get_text() for t in ax.texts)[:2] == ["+0.15", "+0.25"]  # values on bars
    assert len(ax.patches) == 8
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "Higher = the update is mostly format learning" in caption
    plt.close(fig)


def test_plot_on_a_run_without_records(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "diagnostics.py"), "plot", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "no diagnostics.jsonl; train with --probe-every" in result.stderr
    assert "Traceback" not in result.stderr


def test_align_command_prints_cosines(lab, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "diagnostics.py"),
            "align",
            "--model",
            lab["model_dir"],
            "--task",
            "toy_tf",
            "--data-dir",
            lab["data_dir"],
            "--align-batch-size",
            "8",
            "--out",
            str(tmp_path / "a.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "a.json").read_text())
    assert -1 <= saved["cosines"]["model"] <= 1 and "self_attn.v" in result.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--align-batch-size", "0"], "diagnostics.py: error: --align-batch-size 0: expected >= 1"),
        (["--batch-size", "8"], "unrecognized arguments: --batch-size 8"),  # no renamed-flag alias
        (["--device", "tpu"], "--device invalid choice: 'tpu'"),
    ],
)
def test_align_command_refuses_a_bad_flag_in_one_line(lab, capsys, extra, message):
    argv = ["align", "--model", lab["model_dir"], "--task", "toy_tf", "--data-dir", lab["data_dir"]]
    assert diagnostics.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_alignment_under_torchrun_equals_one_process(lab, tmp_path):
    out = tmp_path / "cos.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        os.path.join(ROOT, "tests", "dist_alignment.py"),
        lab["model_dir"],
        lab["data_dir"],
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(out.read_text())
    t5 = model.load_pretrained(lab["model_dir"])
    batch, shuffled = diagnostics.alignment_batches(
        "toy_tf", lab["examples"], lab["tokenizer"], 8, seed=0
    )
    single = diagnostics.gradient_alignment(t5, batch, shuffled)
    for group, value in single.items():
        assert sharded[group] == pytest.approx(value, abs=1e-6), group


# --- during training (promot.py --probe-* / --align-*) ------------------------


def promot_args(lab, out, *extra, steps=4):
    return [
        "--stage",
        "finetune",
        "--model",
        lab["model_dir"],
        "--data-dir",
        lab["data_dir"],
        "--task",
        "toy_tf",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--eval-examples",
        "4",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "4",
        *extra,
    ]


def test_probes_run_at_the_requested_steps_and_leave_training_unchanged(lab, tmp_path):
    import promot

    plain = promot.train(promot.parse_args(promot_args(lab, tmp_path / "plain")))
    probed = promot.train(
        promot.parse_args(
            promot_args(
                lab,
                tmp_path / "probed",
                "--probe-every",
                "2",
                "--probe-tasks",
                "toy_copy",
                "--probe-shots",
                "0,1",
                "--probe-limit",
                "3",
                "--align-steps",
                "0,3",
            )
        )
    )
    records = [json.loads(line) for line in open(tmp_path / "probed" / "diagnostics.jsonl")]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] == "probe"] == [
        ("probe", 0),
        ("probe", 0),
        ("probe", 2),
        ("probe", 2),
        ("probe", 4),
        ("probe", 4),
    ]
    assert [r["step"] for r in records if r["kind"] == "alignment"] == [0, 3]
    a, b = plain.model.state_dict(), probed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same final weights, bit for bit
    # and the figures come out of the recorded run
    pytest.importorskip("matplotlib")
    written = diagnostics.plot([str(tmp_path / "probed")], str(tmp_path / "fig"))
    assert str(tmp_path / "fig" / "in_context.png") in written
    assert str(tmp_path / "fig" / "alignment.png") in written
    # two checkpoints (steps 2 and 4) are too few for a trade-off: its table only
    assert str(tmp_path / "fig" / "tradeoff.csv") in written
    assert str(tmp_path / "fig" / "tradeoff.png") not in written


def test_alignment_flags_are_refused_for_stage_1(lab, tmp_path, capsys):
    import promot

    argv = promot_args(lab, tmp_path / "s1", "--align-steps", "0")
    argv[1] = "1"
    assert promot.main(argv) == 2
    assert "stage 1 trains only the prompt" in capsys.readouterr().err
    assert not (tmp_path / "s1").exists()  # refused before anything was written
