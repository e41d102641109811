"""The one prompt-routing rule (evaluate.route_prompt, evaluate.same_format) for every pair of
the paper's twelve tasks, under each reading of its §4. The default follows the paper's tables:
the stage-1 prompt goes to the fine-tuned task alone."""

import itertools

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
        assert (evaluate.route_prompt(task, {fine_tuned: prompt}, route) is prompt) == want, (
            task,
            fine_tuned,
        )


def test_by_default_the_prompt_goes_to_the_fine_tuned_task_alone():
    prompt = torch.zeros(2, 4)
    for task, fine_tuned in itertools.product(PAPER_TASKS, repeat=2):
        routed = evaluate.route_prompt(task, {fine_tuned: prompt}) is prompt
        assert (
            routed == (task == fine_tuned) == evaluate.same_format(task, fine_tuned)
        )  # LoRA and probes alike


def test_prompt_tuning_leaves_every_unseen_task_as_the_pretrained_model_scores_it():
    # Tables 10, 12-14: the prompt-tuning column equals the pretrained one on all eight tasks,
    # CB and WiC under an RTE prompt and CB under an SNLI prompt included.
    for fine_tuned in data.FINE_TUNING_TASKS:
        for task in data.EVALUATION_TASKS:
            assert evaluate.route_prompt(task, {fine_tuned: torch.zeros(1, 1)}) is None


def test_always_and_never_force_the_prompt_and_always_prefers_one_of_the_same_format():
    rte, wmt = torch.zeros(2, 4), torch.ones(2, 4)
    prompts = {"wmt14_enfr": wmt, "rte": rte}
    assert evaluate.route_prompt("cb", prompts, "always") is rte
    assert evaluate.route_prompt("xsum", prompts, "always") is wmt  # none shares it: the first
    assert all(evaluate.route_prompt(t, prompts, "never") is None for t in PAPER_TASKS)


def test_an_unknown_reading_is_a_clear_error():
    with pytest.raises(BadInput, match="route must be one of fine_tuned_only, same_format"):
        evaluate.route_prompt("rte", {"rte": torch.zeros(1)}, "auto")


def test_evaluate_py_offers_the_readings_as_route_and_defaults_to_fine_tuned_only(tmp_path):
    args = evaluate.parse_args(
        ["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "r.json")]
    )
    assert args.route == "fine_tuned_only"
