"""The one prompt-routing rule (evaluate.route_prompt, evaluate.same_format) for every pair of
the paper's twelve tasks, under each reading of its §4. route_prompt's default is the paper's
words: §4 gives the prompt to "the same format as the fine-tuned target task", and §5.3 says CB
and WiC "share the same format as the RTE fine-tuning task". evaluate.py's default, by_stage,
keeps that rule for ProMoT's prompt and removes a stage-1 prompt on every other task
(evaluate.route_by_stage; end to end on the lab: tests/test_route_by_stage.py)."""

import itertools
import json

import pytest
import torch

import data
import evaluate
from support.errors import BadInput

PAPER_TASKS = data.FINE_TUNING_TASKS + data.EVALUATION_TASKS
# Tasks that share a format under each reading; a task not listed is alone.
SAME_ANSWERS = [
    {"rte", "wic"},
    {"cb", "snli"},
    {"trivia_qa", "web_questions"},
    {"xsum", "wiki_lingua_en"},
]
# §5.3: CB and WiC "share the same format as the RTE fine-tuning task"; SNLI has CB's template.
SAME_FORMAT = [
    {"rte", "wic", "cb", "snli"},
    {"trivia_qa", "web_questions"},
    {"xsum", "wiki_lingua_en"},
]
READINGS = {"fine_tuned_only": [], "same_answers": SAME_ANSWERS, "same_format": SAME_FORMAT}


def expected(task, fine_tuned, groups):
    return task == fine_tuned or any({task, fine_tuned} <= group for group in groups)


def test_the_paper_has_twelve_tasks():
    assert len(set(PAPER_TASKS)) == 12


@pytest.mark.parametrize("route", sorted(READINGS))
def test_the_routing_table_for_every_pair_of_the_twelve_tasks(route):
    prompt = torch.zeros(2, 4)
    for task, fine_tuned in itertools.product(PAPER_TASKS, repeat=2):
        want = expected(task, fine_tuned, READINGS[route])
        assert evaluate.same_format(task, fine_tuned, route) == want, (task, fine_tuned)
        routed = evaluate.route_prompt(task, {fine_tuned: prompt}, route) is prompt
        assert routed == want, (task, fine_tuned)


def test_by_default_rtes_prompt_goes_to_rte_cb_and_wic_as_section_5_3_says():
    prompt = torch.zeros(2, 4)
    routed = {t for t in PAPER_TASKS if evaluate.route_prompt(t, {"rte": prompt}) is prompt}
    assert routed == {"rte", "cb", "wic", "snli"}
    assert {t for t in data.EVALUATION_TASKS if t in routed} == {"cb", "wic"}  # Table 3's tasks


def test_the_default_is_same_format_everywhere_lora_and_probes_included():
    for task, fine_tuned in itertools.product(PAPER_TASKS, repeat=2):
        by_default = evaluate.route_prompt(task, {fine_tuned: True}) is True
        assert by_default == evaluate.same_format(task, fine_tuned)
        assert by_default == expected(task, fine_tuned, SAME_FORMAT)


def test_the_format_groups_are_explicit_in_the_task_table():
    assert {n for n, t in data.TASKS.items() if t.format_group == "true_false"} >= {
        "rte",
        "cb",
        "wic",
        "snli",
    }
    assert data.FORMAT_GROUPS == dict.fromkeys(("rte", "cb", "wic", "snli"), "true_false")
    for name in PAPER_TASKS:  # every other task: its answer format
        task = data.TASKS[name]
        assert task.format_group == data.FORMAT_GROUPS.get(name, task.format)


def test_a_generic_task_sets_its_group_in_task_json_or_takes_its_format(tmp_path):
    for name, spec in {
        "nli_like": {"label_words": ["True", "False", "Neither"], "format_group": "true_false"},
        "plain": {"format": "short_answer"},
        "alone": {},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "task.json").write_text(json.dumps(spec))
    assert "format_group" in data.TASK_JSON_KEYS
    groups = {n: data.get_task(n, tmp_path).format_group for n in ("nli_like", "plain", "alone")}
    assert groups == {"nli_like": "true_false", "plain": "short_answer", "alone": "alone"}
    nli_like, plain = data.get_task("nli_like", tmp_path), data.get_task("plain", tmp_path)
    assert evaluate.same_format(nli_like, "rte") and evaluate.same_format("trivia_qa", plain)
    assert not evaluate.same_format(nli_like, "rte", "same_answers")


def test_always_and_never_force_the_prompt_and_always_prefers_one_of_the_same_format():
    rte, wmt = torch.zeros(2, 4), torch.ones(2, 4)
    prompts = {"wmt14_enfr": wmt, "rte": rte}
    assert evaluate.route_prompt("cb", prompts, "always") is rte
    assert evaluate.route_prompt("xsum", prompts, "always") is wmt  # none shares it: the first
    assert all(evaluate.route_prompt(t, prompts, "never") is None for t in PAPER_TASKS)


def test_an_unknown_reading_is_a_clear_error():
    with pytest.raises(BadInput, match="route must be one of same_format, same_answers"):
        evaluate.route_prompt("rte", {"rte": torch.zeros(1)}, "auto")


def test_evaluate_py_offers_the_readings_as_route_and_defaults_to_by_stage(tmp_path):
    args = evaluate.parse_args(
        ["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "r.json")]
    )
    assert args.route == "by_stage" and "fine_tuned_only" in evaluate.ROUTES
    for route in evaluate.ROUTES:  # each reading stays a choice by name
        argv = ["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "r.json")]
        assert evaluate.parse_args(argv + ["--route", route]).route == route


def test_by_stage_removes_the_prompt_of_every_stage_that_left_the_model_pretrained():
    """§5.1 and Tables 10, 12-14: prompt tuning's unseen-task columns are the pretrained model's,
    so a prompt whose model was not tuned goes to its own task alone; a prompt tuned with its
    model (ProMoT's stage 2 and the ablations, promot.STAGES) keeps §4's same-format rule."""
    import promot

    for name, stage in promot.STAGES.items():
        want = "same_format" if stage.trains_model else "fine_tuned_only"
        assert evaluate.route_by_stage(name) == want, name
    assert evaluate.route_by_stage("1") == "fine_tuned_only"
    assert evaluate.route_by_stage("2") == "same_format"


def test_by_stage_is_no_reading_of_route_prompt_itself():  # evaluate.py resolves it first
    with pytest.raises(BadInput, match="route must be one of"):
        evaluate.route_prompt("rte", {"rte": torch.zeros(1)}, "by_stage")
