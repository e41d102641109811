"""`python data.py show` and `python data.py check`: exact strings and token counts, split
sizes against the paper's Table 8, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data
from helpers import train_spiece

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def data_dir(tmp_path):
    rte = tmp_path / "rte"
    rte.mkdir()
    with open(rte / "train.jsonl", "w") as f:
        for i in range(6):
            f.write(
                json.dumps({"premise": f"A cat {i}.", "hypothesis": "A cat.", "label": i % 2})
                + "\n"
            )
    with open(rte / "val.jsonl", "w") as f:
        for i in range(4):
            f.write(
                json.dumps(
                    {"premise": f"A dog {i}.", "hypothesis": "A cat.", "label": "not_entailment"}
                )
                + "\n"
            )
    with open(rte / "test.jsonl", "w") as f:
        f.write(json.dumps({"premise": "p", "hypothesis": "h", "idx": 0}) + "\n")
    return tmp_path


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_spiece")
    train_spiece(d, ["A cat sat. A dog is true or false question answer"] * 50, 25)
    return d / "spiece.model"


def test_show_prints_the_exact_input_target_and_token_counts(data_dir, spiece, capsys):
    assert (
        data.main(
            [
                "show",
                "--task",
                "rte",
                "--data-dir",
                str(data_dir),
                "--shots",
                "1",
                "--examples",
                "2",
                "--spiece",
                str(spiece),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    tok = data.Tokenizer(spiece)
    queries = data.load_split("rte", data_dir, "validation")[:2]
    pool = data.load_split("rte", data_dir, "train")
    for text, _ in data.kshot_inputs(data.TASKS["rte"], queries, pool, 1, seed=0):
        assert f"input ({len(tok.encode(text))} tokens):\n{text}\n" in out
    target = "<extra_id_0> False <extra_id_1>"
    assert f"target ({len(tok.encode(target))} tokens):\n{target}\n" in out
    assert out.count("=== rte validation #") == 2 and 'references: ["False"]' in out


def test_show_prints_each_requested_number_of_demonstrations(data_dir, capsys):
    argv = [
        "show",
        "--task",
        "rte",
        "--data-dir",
        str(data_dir),
        "--shots",
        "0,2",
        "--examples",
        "1",
    ]
    assert data.main(argv) == 0
    out = capsys.readouterr().out
    assert "=== rte validation #0, 0-shot, metric accuracy ===" in out
    assert "=== rte validation #0, 2-shot, metric accuracy ===" in out
    assert out.count("Is it true or false?") == 1 + 3


def test_show_with_a_bad_shots_list_is_one_line_and_exit_2(data_dir, capsys):
    argv = ["show", "--task", "rte", "--data-dir", str(data_dir), "--shots", "1,x"]
    assert data.main(argv) == 2
    expected = "data.py: error: --shots 1,x: expected comma-separated numbers like 1,4\n"
    assert capsys.readouterr().err == expected


def test_check_prints_split_sizes_beside_table_8(data_dir, capsys):
    assert data.main(["check", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert (
        "rte" in out
        and "train 6 (paper 2490), validation 4 (paper 277), test 1 unlabeled (paper 3000)" in out
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["show", "--task", "nope", "--data-dir", "D"],
            "data.py: error: unknown task 'nope'; known tasks: ",
        ),
        (
            ["show", "--task", "xsum", "--data-dir", "D"],
            "data.py: error: task xsum, split test: D/xsum: folder not found",
        ),
        (["check", "--data-dir", "D/missing"], "data.py: error: D/missing: data folder not found"),
    ],
)
def test_cli_errors_are_one_line_with_nonzero_exit(data_dir, argv, message, capsys):
    argv = [a.replace("D", str(data_dir)) if a.startswith("D") else a for a in argv]
    assert data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("D", str(data_dir), 1)) and err.count("\n") == 1


def test_check_reports_a_bad_file_and_fails(data_dir, capsys):
    with open(data_dir / "rte/train.jsonl", "a") as f:
        f.write("{not json\n")
    assert data.main(["check", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert "train.jsonl:7: malformed JSON" in captured.err and "train ERROR" in captured.out


def test_cli_process_exits_nonzero_without_traceback(data_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "data.py"),
            "show",
            "--task",
            "rte",
            "--data-dir",
            str(data_dir / "nowhere"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "rte: folder not found" in result.stderr


def test_check_warns_where_split_sizes_differ_from_table_8(data_dir, capsys):
    assert data.main(["check", "--data-dir", str(data_dir)]) == 0  # a warning is not a failure
    err = capsys.readouterr().err
    assert "warning: rte train: 6 examples, the paper's Table 8 has 2490" in err
    assert "warning: rte validation: 4 examples, the paper's Table 8 has 277" in err


def test_check_fails_on_a_file_of_unknown_format_and_names_it(data_dir, capsys):
    (data_dir / "rte/train.csv").write_text("premise,hypothesis,label\n")
    assert data.main(["check", "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert (
        f"error: {data_dir / 'rte/train.csv'}: unknown format; promot reads .jsonl, .json, .parquet"
        in err
    )


def test_check_says_a_csv_is_read_only_in_a_task_folder_of_your_own(data_dir, capsys):
    (data_dir / "rte/train.csv").write_text("premise,hypothesis,label\n")
    assert data.main(["check", "--data-dir", str(data_dir)]) == 1
    assert "; .csv and .tsv only in a task folder of your own, with a task.json" in (
        capsys.readouterr().err
    )


def test_check_fails_on_a_save_to_disk_folder(tmp_path, capsys):
    # Dataset.save_to_disk writes arrow files that promot does not read; check must not say OK.
    (tmp_path / "cb/train").mkdir(parents=True)
    (tmp_path / "cb/train/data-00000-of-00001.arrow").write_bytes(b"ARROW1")
    (tmp_path / "cb/train/dataset_info.json").write_text("{}")
    assert data.main(["check", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert (
        "cb              train - (paper 250), validation - (paper 56), test - (paper 250)"
        in captured.out
    )
    assert "data-00000-of-00001.arrow: unknown format" in captured.err
    assert f"error: {tmp_path / 'cb'}: no split in a layout promot reads" in captured.err


def test_check_fails_on_a_missing_required_field_and_names_file_line_field(data_dir, capsys):
    with open(data_dir / "rte/val.jsonl", "a") as f:
        f.write(json.dumps({"premise": "p", "label": "entailment"}) + "\n")
    assert data.main(["check", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert (
        "rte/val.jsonl:5: missing field 'hypothesis'" in captured.err
        and "validation ERROR" in captured.out
    )


def test_check_ignores_hidden_files_and_readmes(data_dir, capsys):
    (data_dir / "rte/.cache/huggingface/download").mkdir(parents=True)
    (data_dir / "rte/.cache/huggingface/download/train.parquet.metadata").write_text("x")
    (data_dir / "rte/README.md").write_text("# RTE")
    assert data.main(["check", "--data-dir", str(data_dir)]) == 0
