"""Parquet input: every task reads the Hub's parquet files (written here with pyarrow) as it
reads the JSON Lines export of the same rows -- same fields, same label encodings -- in
each layout the Hub serves: <split>.parquet, data/<split>-NNNNN-of-MMMMM.parquet shards,
a config folder (rte/...), and the refs/convert/parquet branch's <config>/<split>/0000.parquet."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
from support import dataset_files
from support.errors import BadInput, DamagedFile


def write_parquet(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def examples(task, data_dir, split):
    return [(e.fields, e.targets) for e in data.load_split(task, data_dir, split)]


TRIVIA_ANSWER = {
    "aliases": ["William Shakespeare", "Shakespeare"],
    "normalized_aliases": ["shakespeare"],
    "matched_wiki_entity_name": "",
    "normalized_matched_wiki_entity_name": "",
    "normalized_value": "shakespeare",
    "type": "WikipediaEntity",
    "value": "Shakespeare",
}

# Rows as the Hub's parquet files (and a `datasets` export of them) hold each task.
ROWS = {
    "rte": [
        {"premise": "A cat sat.", "hypothesis": "An animal sat.", "idx": 0, "label": 0},
        {"premise": "A cat sat.", "hypothesis": "Nobody sat.", "idx": 1, "label": 1},
    ],
    "cb": [{"premise": "p", "hypothesis": "h", "idx": i, "label": i} for i in range(3)],
    "wic": [
        {
            "word": "bank",
            "sentence1": "The bank of the river.",
            "sentence2": "The bank closed.",
            "start1": 4,
            "end1": 8,
            "start2": 4,
            "end2": 8,
            "idx": i,
            "label": i,
        }
        for i in range(2)
    ],
    "snli": [{"premise": "p", "hypothesis": "h", "label": label} for label in (0, 1, 2, -1)],
    "openbookqa": [
        {
            "id": "7-980",
            "question_stem": "The sun is",
            "answerKey": "B",
            "choices": {
                "text": ["cold", "a star", "a planet", "wet"],
                "label": ["A", "B", "C", "D"],
            },
        }
    ],
    "trivia_qa": [
        {
            "question": "Who wrote Hamlet?",
            "question_id": "q1",
            "question_source": "x",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {
                "description": [],
                "filename": [],
                "rank": [],
                "title": [],
                "url": [],
                "search_context": [],
            },
            "answer": TRIVIA_ANSWER,
        }
    ],
    "web_questions": [
        {
            "url": "http://www.freebase.com/view/en/justin_bieber",
            "question": "what is his name?",
            "answers": ["Justin Bieber", "JB"],
        }
    ],
    "wmt14_enfr": [{"translation": {"en": "Hello.", "fr": "Bonjour."}}],
    "wmt16_ende": [{"translation": {"de": "Hallo.", "en": "Hello."}}],
    "wmt16_enro": [{"translation": {"en": "Hello.", "ro": "Salut."}}],
    "xsum": [{"document": "A long article.", "summary": "Short.", "id": "1"}],
    "wiki_lingua_en": [
        {
            "gem_id": "wl-1",
            "gem_parent_id": "wl-1",
            "source_language": "en",
            "target_language": "en",
            "source": "How to cook.",
            "target": "Cook.",
            "references": ["Cook.", "Cook it."],
        }
    ],
}


@pytest.mark.parametrize("task", sorted(ROWS))
def test_every_task_reads_hub_parquet_shards_as_its_jsonl_export(tmp_path, task):
    rows = ROWS[task] * 3
    write_jsonl(tmp_path / "jsonl" / task / "test.jsonl", rows)
    write_parquet(tmp_path / "hub" / task / "data/test-00000-of-00002.parquet", rows[:2])
    write_parquet(tmp_path / "hub" / task / "data/test-00001-of-00002.parquet", rows[2:])
    expected = examples(task, tmp_path / "jsonl", "test")
    assert expected and examples(task, tmp_path / "hub", "test") == expected


def test_glue_rte_in_its_hub_layout(tmp_path):
    # `hf download nyu-mll/glue --repo-type dataset --include "rte/*" --local-dir data/rte`
    # writes data/rte/rte/{train,validation,test}-00000-of-00001.parquet; GLUE's label 0 is
    # entailment and 1 not_entailment, as in SuperGLUE; its test labels are hidden (-1).
    schema = pa.schema(
        [
            ("sentence1", pa.string()),
            ("sentence2", pa.string()),
            ("label", pa.int64()),
            ("idx", pa.int32()),
        ]
    )
    rows = {
        "train": [("A cat sat.", "An animal sat.", 0, 0), ("A cat sat.", "Nobody sat.", 1, 1)],
        "validation": [("p", "h", 1, 0)],
        "test": [("p", "h", -1, 0)],
    }
    for split, split_rows in rows.items():
        (tmp_path / "rte/rte").mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(
            [dict(zip(schema.names, r)) for r in split_rows], schema=schema
        )
        pq.write_table(table, tmp_path / f"rte/rte/{split}-00000-of-00001.parquet")
    assert examples("rte", tmp_path, "train") == [
        ({"premise": "A cat sat.", "hypothesis": "An animal sat."}, ["True"]),
        ({"premise": "A cat sat.", "hypothesis": "Nobody sat."}, ["False"]),
    ]
    assert examples("rte", tmp_path, "validation") == [
        ({"premise": "p", "hypothesis": "h"}, ["False"])
    ]
    with pytest.raises(BadInput, match="examples but no labels"):
        data.load_split("rte", tmp_path, "test")


def test_a_generic_task_reads_parquet_too(tmp_path):
    (tmp_path / "my_task").mkdir()
    (tmp_path / "my_task/task.json").write_text('{"template": "Q: {input} A:"}')
    write_parquet(tmp_path / "my_task/validation.parquet", [{"input": "2+2?", "target": "4"}])
    assert examples("my_task", tmp_path, "validation") == [({"input": "2+2?"}, ["4"])]


LAYOUTS = {
    "plain file": ["train.parquet"],
    "Hub shards under data/": [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ],
    "a config folder (--include 'rte/*')": ["rte/train-00000-of-00001.parquet"],
    "refs/convert/parquet": ["rte/train/0000.parquet", "rte/train/0001.parquet"],
    "shards with push_to_hub's hash": ["data/train-00000-of-00001-efcddf7a7a7532ae.parquet"],
    "the converter's older naming": ["default/xsum-train.parquet"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_hub_layout_reads_every_shard_in_order(tmp_path, layout):
    files = LAYOUTS[layout]
    rows = [
        {"premise": f"p{i}", "hypothesis": "h", "idx": i, "label": i % 2}
        for i in range(2 * len(files))
    ]
    for k, name in reversed(list(enumerate(files))):  # written last shard first
        write_parquet(tmp_path / "rte" / name, rows[2 * k : 2 * k + 2])
    assert [e.fields["premise"] for e in data.load_split("rte", tmp_path, "train")] == [
        r["premise"] for r in rows
    ]


def test_jsonl_beside_parquet_is_read_first(tmp_path):
    write_jsonl(tmp_path / "xsum/test.jsonl", [{"document": "from jsonl", "summary": "s"}])
    write_parquet(tmp_path / "xsum/test.parquet", [{"document": "from parquet", "summary": "s"}])
    assert examples("xsum", tmp_path, "test")[0][0] == {"article": "from jsonl"}


def test_split_files_returns_the_shards_in_index_order(tmp_path):
    for i in (2, 0, 1):
        write_parquet(tmp_path / f"data/validation-0000{i}-of-00003.parquet", [{"a": i}])
    assert [p.name for p in dataset_files.split_files(tmp_path, "validation")] == [
        f"validation-0000{i}-of-00003.parquet" for i in range(3)
    ]


# --- Bad input ----------------------------------------------------------------------------


def test_wrong_columns_name_the_file_the_row_and_the_field(tmp_path):
    write_parquet(tmp_path / "rte/train.parquet", [{"sentence": "p", "label": 0}])
    with pytest.raises(DamagedFile, match=r"rte/train.parquet: row 1: missing field 'premise'"):
        data.load_split("rte", tmp_path, "train")


def test_a_wrong_type_names_the_row(tmp_path):
    write_parquet(
        tmp_path / "xsum/test.parquet",
        [{"document": "d", "summary": "s"}, {"document": None, "summary": "s"}],
    )
    with pytest.raises(
        DamagedFile, match=r"xsum/test.parquet: row 2: field 'document' should be a string"
    ):
        data.load_split("xsum", tmp_path, "test")


def test_a_label_outside_the_encoding_is_refused_as_in_jsonl(tmp_path):
    write_parquet(tmp_path / "cb/train.parquet", [{"premise": "p", "hypothesis": "h", "label": 7}])
    with pytest.raises(
        DamagedFile, match=r"cb/train.parquet: row 1: label 7 is not one of 0, 1, 2"
    ):
        data.load_split("cb", tmp_path, "train")


def test_a_missing_shard_is_named(tmp_path):
    for i in (0, 2):
        write_parquet(
            tmp_path / f"xsum/data/test-0000{i}-of-00003.parquet",
            [{"document": "d", "summary": "s"}],
        )
    with pytest.raises(
        DamagedFile,
        match=r"sharded into 3 files, but 1 of them missing \(test-00001-of-00003.parquet\)",
    ):
        data.load_split("xsum", tmp_path, "test")


def test_a_split_in_two_sub_folders_is_ambiguous(tmp_path):
    for config in ("rte", "rte_copy"):
        write_parquet(tmp_path / f"rte/{config}/train-00000-of-00001.parquet", ROWS["rte"])
    with pytest.raises(
        BadInput, match=r"split 'train' is in several sub-folders \(rte, rte_copy\)"
    ):
        data.load_split("rte", tmp_path, "train")


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "xsum").mkdir()
    (tmp_path / "xsum/test.parquet").write_text("not parquet")
    with pytest.raises(DamagedFile, match=r"xsum/test.parquet: not a readable parquet file"):
        data.load_split("xsum", tmp_path, "test")


def test_without_pyarrow_one_message_gives_the_install_command(tmp_path, monkeypatch):
    write_parquet(tmp_path / "xsum/test.parquet", [{"document": "d", "summary": "s"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow...` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(BadInput) as err:
        data.load_split("xsum", tmp_path, "test")
    assert str(err.value) == (
        f"task xsum, split test: {tmp_path / 'xsum/test.parquet'}: reading parquet files needs the optional "
        "package pyarrow; install it with `pip install pyarrow`"
    )


def test_pyarrow_is_imported_only_when_a_parquet_file_is_met(tmp_path):
    write_jsonl(tmp_path / "xsum/test.jsonl", [{"document": "d", "summary": "s"}])
    code = (
        "import sys, data; data.load_split('xsum', sys.argv[1], 'test'); "
        "print('pyarrow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(data.__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- data.py check on parquet -----------------------------------------------------------------


def test_check_counts_hub_parquet_splits(tmp_path, capsys):
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        write_parquet(tmp_path / f"cb/cb/{split}-00000-of-00001.parquet", ROWS["cb"][:n])
    assert data.main(["check", "--data-dir", str(tmp_path)]) == 0
    assert (
        "cb              train 3 (paper 250), validation 2 (paper 56), test 1 (paper 250)"
        in capsys.readouterr().out
    )


def test_check_without_pyarrow_fails_with_the_install_command(tmp_path, capsys, monkeypatch):
    write_parquet(tmp_path / "xsum/data/test-00000-of-00001.parquet", ROWS["xsum"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert data.main(["check", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "test ERROR" in captured.out
    assert (
        f"error: task xsum, split test: {tmp_path / 'xsum/data/test-00000-of-00001.parquet'}: "
        "reading parquet files needs the "
        "optional package pyarrow; install it with `pip install pyarrow`"
    ) in captured.err


def test_check_names_the_parquet_file_row_and_field_of_wrong_columns(tmp_path, capsys):
    write_parquet(tmp_path / "xsum/test.parquet", [{"article": "d", "summary": "s"}])
    assert data.main(["check", "--data-dir", str(tmp_path)]) == 1
    assert "xsum/test.parquet: row 1: missing field 'document'" in capsys.readouterr().err
