"""Readers of data.py on small files written here in each data set's published layout:
the JSON Lines a `datasets` export (`Dataset.to_json`) writes, and the official releases."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
from support import dataset_files
from support.errors import BadInput, DamagedFile


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def targets(examples):
    return [e.targets for e in examples]


# --- SuperGLUE: RTE, CB, WiC ------------------------------------------------


def test_rte_datasets_export_maps_class_ids_to_true_false(tmp_path):
    write_jsonl(
        tmp_path / "rte/train.jsonl",
        [
            {"premise": "A cat sat.", "hypothesis": "An animal sat.", "idx": 0, "label": 0},
            {"premise": "A cat sat.", "hypothesis": "Nobody sat.", "idx": 1, "label": 1},
        ],
    )
    examples = data.load_split("rte", tmp_path, "train")
    assert examples[0].fields == {"premise": "A cat sat.", "hypothesis": "An animal sat."}
    assert targets(examples) == [["True"], ["False"]]  # 0 = entailment, 1 = not_entailment


def test_rte_superglue_release_uses_val_jsonl_and_string_labels(tmp_path):
    write_jsonl(
        tmp_path / "rte/val.jsonl",
        [
            {"premise": "p", "hypothesis": "h", "label": "not_entailment", "idx": 0},
            {"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 1},
        ],
    )
    assert targets(data.load_split("rte", tmp_path, "validation")) == [["False"], ["True"]]


def test_rte_glue_layout_is_read_from_its_fields(tmp_path):
    # nyu-mll/glue, config rte: sentence1/sentence2, label 0 = entailment, 1 = not_entailment, -1 hidden.
    write_jsonl(
        tmp_path / "rte/train.jsonl",
        [
            {"sentence1": "A cat sat.", "sentence2": "An animal sat.", "label": 0, "idx": 0},
            {"sentence1": "A cat sat.", "sentence2": "Nobody sat.", "label": 1, "idx": 1},
        ],
    )
    write_jsonl(
        tmp_path / "rte/test.jsonl", [{"sentence1": "p", "sentence2": "h", "label": -1, "idx": 0}]
    )
    examples = data.load_split("rte", tmp_path, "train")
    assert examples[0].fields == {"premise": "A cat sat.", "hypothesis": "An animal sat."}
    assert targets(examples) == [["True"], ["False"]]
    with pytest.raises(BadInput, match="examples but no labels"):
        data.load_split("rte", tmp_path, "test")


def test_wic_keeps_its_own_sentence1_sentence2(tmp_path):
    write_jsonl(
        tmp_path / "wic/train.jsonl",
        [{"word": "w", "sentence1": "a", "sentence2": "b", "label": 1}],
    )
    assert data.load_split("wic", tmp_path, "train")[0].fields == {
        "word": "w",
        "sentence1": "a",
        "sentence2": "b",
    }


def test_cb_three_labels_both_layouts(tmp_path):
    write_jsonl(
        tmp_path / "cb/train.jsonl",
        [{"premise": "p", "hypothesis": "h", "label": lab} for lab in (0, 1, 2)],
    )
    write_jsonl(
        tmp_path / "cb/val.jsonl",
        [
            {"premise": "p", "hypothesis": "h", "label": lab}
            for lab in ("entailment", "contradiction", "neutral")
        ],
    )
    expected = [["True"], ["False"], ["Neither"]]
    assert targets(data.load_split("cb", tmp_path, "train")) == expected
    assert targets(data.load_split("cb", tmp_path, "validation")) == expected


def test_wic_labels_ints_and_booleans(tmp_path):
    row = {
        "word": "bank",
        "sentence1": "The bank of the river.",
        "sentence2": "The bank closed.",
        "start1": 4,
        "end1": 8,
        "start2": 4,
        "end2": 8,
    }
    write_jsonl(tmp_path / "wic/train.jsonl", [{**row, "label": 0}, {**row, "label": 1}])
    write_jsonl(tmp_path / "wic/val.jsonl", [{**row, "label": False}, {**row, "label": True}])
    assert targets(data.load_split("wic", tmp_path, "train")) == [["False"], ["True"]]
    examples = data.load_split("wic", tmp_path, "validation")
    assert targets(examples) == [["False"], ["True"]]
    assert examples[0].fields == {
        "word": "bank",
        "sentence1": row["sentence1"],
        "sentence2": row["sentence2"],
    }


def test_superglue_hidden_test_labels_are_unlabeled(tmp_path):
    write_jsonl(
        tmp_path / "rte/test.jsonl", [{"premise": "p", "hypothesis": "h", "idx": 0, "label": -1}]
    )
    write_jsonl(
        tmp_path / "cb/test.jsonl", [{"premise": "p", "hypothesis": "h", "idx": 0}]
    )  # release
    for name in ("rte", "cb"):
        with pytest.raises(BadInput, match="1 examples but no labels"):
            data.load_split(name, tmp_path, "test")


# --- SNLI, OpenbookQA ---------------------------------------------------------


def test_snli_datasets_export_drops_no_gold_label(tmp_path):
    write_jsonl(
        tmp_path / "snli/train.jsonl",
        [{"premise": "p", "hypothesis": f"h{lab}", "label": lab} for lab in (0, 1, 2, -1)],
    )
    examples = data.load_split("snli", tmp_path, "train")
    assert targets(examples) == [
        ["True"],
        ["Neither"],
        ["False"],
    ]  # 0 entailment, 1 neutral, 2 contradiction


def test_snli_official_release_drops_dash_gold_label(tmp_path):
    write_jsonl(
        tmp_path / "snli/snli_1.0_dev.jsonl",
        [
            {"sentence1": "s1", "sentence2": "s2", "gold_label": g, "annotator_labels": [g]}
            for g in ("contradiction", "-", "entailment", "neutral")
        ],
    )
    examples = data.load_split("snli", tmp_path, "validation")
    assert targets(examples) == [["False"], ["True"], ["Neither"]]
    assert examples[0].fields == {"premise": "s1", "hypothesis": "s2"}


def test_openbookqa_both_layouts_give_letter_targets(tmp_path):
    write_jsonl(
        tmp_path / "openbookqa/train.jsonl",
        [
            {
                "id": "1",
                "question_stem": "The sun is",
                "answerKey": "C",
                "choices": {
                    "text": ["cold", "a planet", "a star", "wet"],
                    "label": ["A", "B", "C", "D"],
                },
            }
        ],
    )
    write_jsonl(
        tmp_path / "openbookqa/test.jsonl",
        [
            {
                "id": "1",
                "answerKey": "B",
                "question": {
                    "stem": "The sun is",
                    "choices": [
                        {"text": t, "label": k}
                        for t, k in zip(["cold", "a star", "a planet", "wet"], "ABCD")
                    ],
                },
            }
        ],
    )
    train = data.load_split("openbookqa", tmp_path, "train")
    assert train[0].targets == ["C"]
    assert data.make_input(data.TASKS["openbookqa"], train[0]) == (
        "Q: The sun is A) cold B) a planet C) a star D) wet A: <extra_id_0>"
    )
    test = data.load_split("openbookqa", tmp_path, "test")
    assert test[0].targets == ["B"] and test[0].fields["option_b"] == "a star"


# --- Closed-book QA -------------------------------------------------------------


def test_trivia_qa_datasets_export_value_then_aliases(tmp_path):
    write_jsonl(
        tmp_path / "trivia_qa/validation.jsonl",
        [
            {
                "question": "Who wrote Hamlet?",
                "question_id": "q1",
                "question_source": "x",
                "entity_pages": {},
                "search_results": {},
                "answer": {
                    "value": "Shakespeare",
                    "aliases": ["William Shakespeare", "Shakespeare", "The Bard"],
                    "normalized_aliases": [],
                    "normalized_value": "shakespeare",
                    "type": "WikipediaEntity",
                },
            }
        ],
    )
    [example] = data.load_split("trivia_qa", tmp_path, "validation")
    assert example.fields == {"question": "Who wrote Hamlet?"}
    assert example.targets == ["Shakespeare", "William Shakespeare", "The Bard"]


def test_trivia_qa_hidden_test_falls_back_to_validation_with_a_warning(tmp_path):
    question = {"question": "q", "answer": {"value": "<unk>", "aliases": []}}
    write_jsonl(tmp_path / "trivia_qa/test.jsonl", [question])
    write_jsonl(
        tmp_path / "trivia_qa/validation.jsonl",
        [{"question": "q", "answer": {"value": "a", "aliases": ["a"]}}],
    )
    warnings = []
    split, examples = data.load_eval_split("trivia_qa", tmp_path, warn=warnings.append)
    assert split == "validation" and examples[0].targets == ["a"]
    assert len(warnings) == 1 and "no labels" in warnings[0] and "validation" in warnings[0]


def test_trivia_qa_official_json_reads_web_and_wikipedia(tmp_path):
    def release(question, value, aliases):
        return {
            "Data": [
                {
                    "Question": question,
                    "QuestionId": "x",
                    "QuestionSource": "y",
                    "Answer": {
                        "Value": value,
                        "Aliases": aliases,
                        "NormalizedValue": value.lower(),
                    },
                    "EntityPages": [],
                    "SearchResults": [],
                }
            ],
            "Domain": "Web",
            "Version": 1.0,
        }

    write_json(
        tmp_path / "trivia_qa/qa/web-dev.json",
        release("Q web", "Paris", ["Paris", "City of Light"]),
    )
    write_json(tmp_path / "trivia_qa/qa/wikipedia-dev.json", release("Q wiki", "42", []))
    examples = data.load_split("trivia_qa", tmp_path, "validation")
    assert [e.fields["question"] for e in examples] == ["Q web", "Q wiki"]
    assert targets(examples) == [["Paris", "City of Light"], ["42"]]


def trivia_release_file(path, questions, answers=True):
    """A qa/*.json file as triviaqa-rc.tar.gz lays it out (fields padded as in the release)."""
    records = [
        {
            "Question": f" {q} ",
            "QuestionId": q,
            "QuestionSource": "x",
            "EntityPages": [],
            "SearchResults": [],
        }
        for q in questions
    ]
    if answers:
        for r in records:
            r["Answer"] = {
                "Value": f"{r['QuestionId']} answer ",
                "Aliases": [" alias"],
                "NormalizedValue": "v",
                "NormalizedAliases": ["alias"],
                "Type": "FreeForm",
            }
    write_json(path, {"Data": records, "Domain": "Web", "Version": 1.0, "Split": "dev"})


def test_trivia_qa_release_layout_counts_the_verified_dev_files_as_datasets_does(tmp_path):
    # The release's validation is 407 + 318 + 9,951 + 7,993 = 18,669 questions (Table 8): the
    # verified-*-dev.json files are part of it. Here 1 + 2 + 3 + 4, in datasets' sorted order.
    qa = tmp_path / "trivia_qa/qa"
    trivia_release_file(qa / "web-dev.json", ["w1", "w2", "w3"])
    trivia_release_file(qa / "wikipedia-dev.json", ["k1", "k2", "k3", "k4"])
    trivia_release_file(qa / "verified-web-dev.json", ["vw1"])
    trivia_release_file(qa / "verified-wikipedia-dev.json", ["vk1", "vk2"])
    trivia_release_file(qa / "web-train.json", ["t1"])
    trivia_release_file(qa / "wikipedia-train.json", ["t2", "t3"])
    trivia_release_file(qa / "web-test-without-answers.json", ["x1"], answers=False)
    trivia_release_file(qa / "wikipedia-test-without-answers.json", ["x2"], answers=False)
    validation = data.load_split("trivia_qa", tmp_path, "validation")
    assert [e.fields["question"] for e in validation] == [
        "vw1",
        "vk1",
        "vk2",
        "w1",
        "w2",
        "w3",
        "k1",
        "k2",
        "k3",
        "k4",
    ]
    assert validation[0].targets == ["vw1 answer", "alias"]  # stripped, as datasets strips them
    assert len(data.load_split("trivia_qa", tmp_path, "train")) == 3
    with pytest.raises(BadInput, match="2 examples but no labels"):
        data.load_split("trivia_qa", tmp_path, "test")


def test_web_questions_datasets_export(tmp_path):
    write_jsonl(
        tmp_path / "web_questions/test.jsonl",
        [
            {
                "url": "http://www.freebase.com/view/en/x",
                "question": "where is x?",
                "answers": ["Ohio", "USA"],
            }
        ],
    )
    [example] = data.load_split("web_questions", tmp_path, "test")
    assert example.fields == {"question": "where is x?"} and example.targets == ["Ohio", "USA"]


def test_web_questions_official_target_value_is_parsed(tmp_path):
    write_json(
        tmp_path / "web_questions/webquestions.examples.train.json",
        [
            {
                "url": "u",
                "targetValue": '(list (description "Jazmine Sullivan") (description Ohio))',
                "utterance": "what is x?",
            },
            {
                "url": "u",
                "targetValue": '(list (description "The \\"Rock\\""))',
                "utterance": "who?",
            },
        ],
    )
    examples = data.load_split("web_questions", tmp_path, "train")
    assert targets(examples) == [["Jazmine Sullivan", "Ohio"], ['The "Rock"']]


# --- Translation ------------------------------------------------------------------


def test_wmt_datasets_export_english_source(tmp_path):
    write_jsonl(
        tmp_path / "wmt16_ende/test.jsonl",
        [{"translation": {"de": "Hallo Welt", "en": "Hello world"}}],
    )
    [example] = data.load_split("wmt16_ende", tmp_path, "test")
    assert example.fields == {"sentence": "Hello world"} and example.targets == ["Hallo Welt"]
    assert data.make_input(data.TASKS["wmt16_ende"], example) == (
        "Translate English to German: Hello world <extra_id_0>"
    )


def test_wmt_two_aligned_plain_text_files(tmp_path):
    (tmp_path / "wmt14_enfr").mkdir()
    (tmp_path / "wmt14_enfr/newstest2014.en").write_text("Hello.\nThe cat.\n", encoding="utf-8")
    (tmp_path / "wmt14_enfr/newstest2014.fr").write_text("Bonjour.\nLe chat.\n", encoding="utf-8")
    examples = data.load_split("wmt14_enfr", tmp_path, "test")
    assert [(e.fields["sentence"], e.targets) for e in examples] == [
        ("Hello.", ["Bonjour."]),
        ("The cat.", ["Le chat."]),
    ]


def test_wmt_misaligned_files_are_an_error(tmp_path):
    (tmp_path / "wmt16_enro").mkdir()
    (tmp_path / "wmt16_enro/test.en").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "wmt16_enro/test.ro").write_text("a\n", encoding="utf-8")
    with pytest.raises(DamagedFile, match=r"test.en has 2 lines but .*test.ro has 1"):
        data.load_split("wmt16_enro", tmp_path, "test")


# --- Summarization ------------------------------------------------------------------


def test_xsum_datasets_export(tmp_path):
    write_jsonl(
        tmp_path / "xsum/test.jsonl",
        [{"document": "Long text.", "summary": "Short.", "id": "41141109"}],
    )
    [example] = data.load_split("xsum", tmp_path, "test")
    assert data.make_input(data.TASKS["xsum"], example) == (
        "Article: Long text. One sentence summary: <extra_id_0>"
    )
    assert example.targets == ["Short."]


def test_wiki_lingua_gem_export_uses_references(tmp_path):
    write_jsonl(
        tmp_path / "wiki_lingua_en/test.jsonl",
        [
            {
                "gem_id": "g",
                "source": "Steps.",
                "target": "Do it.",
                "references": ["Do it.", "Do it now."],
            }
        ],
    )
    [example] = data.load_split("wiki_lingua_en", tmp_path, "test")
    assert example.fields == {"article": "Steps."} and example.targets == ["Do it.", "Do it now."]


# --- Generic JSONL and registered tasks ------------------------------------------------


def test_generic_jsonl_task_from_task_json(tmp_path):
    write_json(
        tmp_path / "capitals/task.json",
        {"template": "Q: {input} A:", "metric": "exact_match", "prefix": "Q:"},
    )
    write_jsonl(
        tmp_path / "capitals/train.jsonl",
        [
            {"input": "Capital of France?", "target": "Paris"},
            {"input": "Capital of Peru?", "targets": ["Lima", "lima"]},
        ],
    )
    task = data.load_task("capitals", tmp_path)
    assert "capitals" not in data.TASKS  # read, not registered
    assert task.metric == "exact_match" and task.prefix == "Q:"
    examples = data.load_split(task, tmp_path, "train")
    assert targets(examples) == [["Paris"], ["Lima", "lima"]]
    assert data.make_input(task, examples[0]) == "Q: Capital of France? A: <extra_id_0>"


def test_register_task_with_its_own_reader(tmp_path):
    def load(data_dir, split):
        return [data.Example({"x": f"{split} {i}"}, [str(i % 2)]) for i in range(6)]

    task = data.register_task(
        data.Task("parity_demo", "Is {x} odd? answer:", "accuracy", ("0", "1")), load, replace=True
    )
    try:
        assert data.get_task("parity_demo") is task
        examples = data.load_split("parity_demo", tmp_path, "validation")
        assert data.make_input(task, examples[1]) == "Is validation 1 odd? answer: <extra_id_0>"
    finally:
        del data.TASKS["parity_demo"]


def test_register_task_refuses_duplicates_and_bad_metrics():
    with pytest.raises(ValueError, match="already registered"):
        data.register_task(data.TASKS["rte"])
    with pytest.raises(ValueError, match="metric 'f1'"):
        data.register_task(data.Task("x", "{a}", "f1"), lambda d, s: [])


def test_limit_keeps_a_seeded_sample_in_file_order(tmp_path):
    write_jsonl(
        tmp_path / "xsum/train.jsonl", [{"document": f"d{i}", "summary": "s"} for i in range(50)]
    )
    sample = [
        int(e.fields["article"][1:]) for e in data.load_split("xsum", tmp_path, "train", limit=5)
    ]
    assert len(set(sample)) == 5 and sample == sorted(sample) and sample != [0, 1, 2, 3, 4]
    assert len(data.load_split("xsum", tmp_path, "train", limit=500)) == 50  # all of them


# --- Bad input: one clear error each -------------------------------------------------------


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(BadInput, match=r"rte: folder not found"):
        data.load_split("rte", tmp_path, "train")


def test_missing_file_lists_accepted_names(tmp_path):
    (tmp_path / "rte").mkdir()
    with pytest.raises(
        BadInput,
        match=r"no file for split 'validation'; accepted names: "
        r"validation.jsonl, validation.json, val.jsonl",
    ):
        data.load_split("rte", tmp_path, "validation")


@pytest.mark.parametrize(
    "names", [("train.jsonl", "train.json"), ("validation.jsonl", "val.jsonl")]
)
def test_two_files_for_one_split_are_refused_naming_both(tmp_path, names):
    for name in names:
        write_jsonl(tmp_path / "rte" / name, [{"premise": "p", "hypothesis": "h", "label": 0}])
    split = "train" if names[0].startswith("train") else "validation"
    with pytest.raises(BadInput, match=rf"{names[0]} and {names[1]} are files of one split"):
        data.load_split("rte", tmp_path, split)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "rte/train.jsonl"
    write_jsonl(path, [{"premise": "p", "hypothesis": "h", "label": 0}])
    with open(path, "a") as f:
        f.write('{"premise": "p", "hypothesis": \n')
    with pytest.raises(DamagedFile, match=r"rte/train.jsonl:2: malformed JSON"):
        data.load_split("rte", tmp_path, "train")


def test_missing_field_names_field_file_and_line(tmp_path):
    write_jsonl(
        tmp_path / "rte/train.jsonl",
        [{"premise": "p", "hypothesis": "h", "label": 0}, {"premise": "p", "label": 0}],
    )
    with pytest.raises(DamagedFile, match=r"rte/train.jsonl:2: missing field 'hypothesis'"):
        data.load_split("rte", tmp_path, "train")


def test_missing_nested_field(tmp_path):
    write_jsonl(tmp_path / "wmt16_ende/test.jsonl", [{"translation": {"en": "Hi"}}])
    with pytest.raises(DamagedFile, match=r"test.jsonl:1: missing field 'translation.de'"):
        data.load_split("wmt16_ende", tmp_path, "test")


def test_unknown_label_lists_accepted_values(tmp_path):
    write_jsonl(tmp_path / "cb/train.jsonl", [{"premise": "p", "hypothesis": "h", "label": 7}])
    with pytest.raises(
        DamagedFile,
        match=r"train.jsonl:1: label 7 is not one of 0, 1, 2, "
        r'"entailment", "contradiction", "neutral"',
    ):
        data.load_split("cb", tmp_path, "train")


def test_a_data_error_names_its_task_and_split_first(tmp_path):
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb/train.jsonl").write_text('{"premise": "a"}\n', encoding="utf-8")
    with pytest.raises(DamagedFile, match=r"^task cb, split train: .*cb/train.jsonl:1: "):
        data.load_split("cb", tmp_path, "train")
    with pytest.raises(BadInput, match=r"^task cb, split validation: .*no file for split"):
        data.load_split("cb", tmp_path, "validation")


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "xsum").mkdir()
    (tmp_path / "xsum/test.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DamagedFile, match=r"xsum/test.jsonl: no examples in split 'test'"):
        data.load_split("xsum", tmp_path, "test")


def test_non_utf8_bytes_name_the_line(tmp_path):
    (tmp_path / "xsum").mkdir()
    (tmp_path / "xsum/test.jsonl").write_bytes(
        b'{"document": "ok", "summary": "s"}\n{"document": "caf\xe9", "summary": "s"}\n'
    )
    with pytest.raises(DamagedFile, match=r"xsum/test.jsonl:2: not UTF-8 text \(byte 0xe9"):
        data.load_split("xsum", tmp_path, "test")


def test_non_utf8_in_a_whole_json_file(tmp_path):
    (tmp_path / "web_questions").mkdir()
    (tmp_path / "web_questions/webquestions.examples.test.json").write_bytes(
        b'[\n{"utterance": "\xff"}]'
    )
    with pytest.raises(DamagedFile, match=r"webquestions.examples.test.json:2: not UTF-8"):
        data.load_split("web_questions", tmp_path, "test")


def test_field_of_the_wrong_type(tmp_path):
    write_jsonl(tmp_path / "xsum/test.jsonl", [{"document": 3, "summary": "s"}])
    with pytest.raises(DamagedFile, match=r"test.jsonl:1: field 'document' should be a string"):
        data.load_split("xsum", tmp_path, "test")


def test_bad_webquestions_target_value(tmp_path):
    write_json(
        tmp_path / "web_questions/webquestions.examples.test.json",
        [{"utterance": "q", "targetValue": "Ohio"}],
    )
    with pytest.raises(DamagedFile, match=r"\[0\]: targetValue 'Ohio' is not"):
        data.load_split("web_questions", tmp_path, "test")


def test_task_json_with_an_unknown_key_is_an_error(tmp_path):
    write_json(tmp_path / "mine/task.json", {"template": "{input}", "metrc": "bleu"})
    with pytest.raises(
        BadInput, match=r"task.json: unknown key\(s\) metrc; accepted: template, metric"
    ):
        data.load_task("mine", tmp_path)


def test_template_field_missing_from_an_example_is_an_error():
    with pytest.raises(BadInput, match=r"task rte: example has no field 'hypothesis'"):
        data.make_input(data.TASKS["rte"], data.Example({"premise": "p"}, ["True"]))


def test_labeled_test_split_is_used_without_fallback(tmp_path):
    write_jsonl(tmp_path / "xsum/test.jsonl", [{"document": "d", "summary": "s"}])
    warnings = []
    split, examples = data.load_eval_split("xsum", tmp_path, warn=warnings.append)
    assert split == "test" and len(examples) == 1 and warnings == []


# --- support/dataset_files.py: the leaf the readers live in ---------------------------------


def test_a_split_without_a_file_is_a_returned_no_split_file_and_load_split_a_bad_input(tmp_path):
    (tmp_path / "rte").mkdir()
    reader = dataset_files.superglue_reader(
        "rte", ("premise", "hypothesis"), dataset_files.RTE_LABELS
    )
    missing = reader(tmp_path, "train")
    assert isinstance(missing, dataset_files.NoSplitFile)
    assert missing.message.startswith(
        f"{tmp_path / 'rte'}: no file for split 'train'; accepted names: "
    )
    with pytest.raises(BadInput) as err:
        data.load_split("rte", tmp_path, "train")
    assert str(err.value) == f"task rte, split train: {missing.message}"


def test_the_leaf_raises_the_two_error_types_of_support_errors():
    assert dataset_files.BadInput is BadInput and dataset_files.DamagedFile is DamagedFile


def test_a_lookup_registers_nothing_and_register_tasks_registers_a_task_folder(tmp_path):
    write_json(tmp_path / "lookup_only/task.json", {"template": "Q: {input} A:"})
    assert data.get_task("lookup_only", tmp_path).template == "Q: {input} A:"
    assert "lookup_only" not in data.TASKS
    try:
        [task] = data.register_tasks(["lookup_only"], tmp_path)
        assert data.get_task("lookup_only") is task and task.eval_split == "validation"
        assert data.register_tasks(["lookup_only", "rte"], tmp_path) == [task, data.TASKS["rte"]]
    finally:
        data.TASKS.pop("lookup_only", None)


def test_readers_return_plain_fields_and_targets(tmp_path):
    write_jsonl(tmp_path / "rte/train.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}])
    reader = dataset_files.superglue_reader(
        "rte", ("premise", "hypothesis"), dataset_files.RTE_LABELS
    )
    assert reader(tmp_path, "train") == [({"premise": "p", "hypothesis": "h"}, ["True"])]


def test_read_jsonl_takes_a_str_path_and_skips_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(dataset_files.read_jsonl(str(path))) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DamagedFile, match=r"x.jsonl:2: expected a JSON object, got list"):
        list(dataset_files.read_jsonl(str(path)))


def test_parse_webquestions_target_reads_quoted_and_bare_descriptions():
    assert dataset_files.parse_webquestions_target(
        '(list (description "Jazmine Sullivan") (description Ohio))', "here"
    ) == ["Jazmine Sullivan", "Ohio"]


def test_dataset_files_works_copied_alone_with_the_errors_module(tmp_path):
    shutil.copy(dataset_files.__file__, tmp_path / "dataset_files.py")
    (tmp_path / "support").mkdir()
    shutil.copy(Path(dataset_files.__file__).parent / "errors.py", tmp_path / "support/errors.py")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dataset_files, sys; print(sorted(m for m in "
            "sys.modules if m.split('.')[0] in ('data', 'support', 'torch')))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['support', 'support.errors']"
