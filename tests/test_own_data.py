"""A user's own data (issue 30): a task folder of CSV or TSV files read as JSON Lines are (header
row, quoted fields with commas and newlines, UTF-8 with or without a byte-order mark), a
task.json whose "fields" maps the template's fields to the columns, and every "not found" naming
what it did find. End to end: a CSV task trains stage 1 with promot.main and is scored by
evaluate.main, beside a JSON Lines task of the same folder."""

import csv
import json
import random

import pytest

import data
import evaluate
import promot
import promot_fixtures as pf
from support import dataset_files
from support.errors import BadInput, DamagedFile

TEMPLATE = "{text} question: is it big? answer:"
MAPPING = {"template": TEMPLATE, "fields": {"target": "label"}, "metric": "accuracy"}


def write_table(path, rows, delimiter=",", bom=False):
    """`rows` (header first) written by Python's csv writer, as pandas or Excel write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def write_task(folder, spec, splits):
    """A task folder: task.json and {split file name: rows}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(spec), encoding="utf-8")
    for name, rows in splits.items():
        write_table(folder / name, rows, "\t" if name.endswith(".tsv") else ",")
    return folder


def rows_of(examples):
    return [(e.fields["text"], e.targets) for e in examples]


# --- CSV and TSV read as JSON Lines are ------------------------------------------------------


def test_csv_quoted_commas_newlines_and_quotes_come_back_as_written(tmp_path):
    texts = ['the cat, "big" one', "line one\nline two\r\nline three", "plain"]
    write_task(
        tmp_path / "mine",
        MAPPING,
        {"train.csv": [["text", "label"]] + [[t, "big"] for t in texts]},
    )
    assert rows_of(data.load_split("mine", tmp_path, "train")) == [(t, ["big"]) for t in texts]


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    folder = write_task(tmp_path / "mine", MAPPING, {})
    write_table(folder / "train.csv", [["text", "label"], ["a", "big"]], bom=True)
    assert (folder / "train.csv").read_bytes().startswith(b"\xef\xbb\xbftext")
    assert rows_of(data.load_split("mine", tmp_path, "train")) == [("a", ["big"])]


def test_a_byte_order_mark_before_json_lines_is_read_too(tmp_path):
    folder = write_task(tmp_path / "mine", {"template": "{input}"}, {})
    (folder / "train.jsonl").write_bytes(b'\xef\xbb\xbf{"input": "a", "target": "b"}\n')
    examples = data.load_split("mine", tmp_path, "train")
    assert [(e.fields, e.targets) for e in examples] == [({"input": "a"}, ["b"])]


def test_tsv_is_tab_separated_with_the_same_quoting(tmp_path):
    texts = ["a, with a comma", "a\ttab inside quotes", 'a "quoted" word']
    write_task(
        tmp_path / "mine",
        MAPPING,
        {"validation.tsv": [["text", "label"]] + [[t, "small"] for t in texts]},
    )
    got = data.load_split("mine", tmp_path, "validation")
    assert rows_of(got) == [(t, ["small"]) for t in texts]


def test_fields_map_the_default_template_input_and_the_target_to_columns(tmp_path):
    spec = {"fields": {"input": "text", "target": "label"}}  # template "{input}" by default
    write_task(tmp_path / "mine", spec, {"train.csv": [["text", "label"], ["a cat", "big"]]})
    task = data.load_task("mine", tmp_path)
    (example,) = data.load_split(task, tmp_path, "train")
    assert example.targets == ["big"]
    assert data.make_input(task, example) == "a cat <extra_id_0>"


def test_without_fields_a_csv_reads_input_and_target_columns_like_json_lines(tmp_path):
    write_task(
        tmp_path / "mine",
        {"template": "Q: {input} A:"},
        {"train.csv": [["input", "target", "id"], ["a", "b", "7"]]},
    )
    (example,) = data.load_split("mine", tmp_path, "train")
    assert (example.fields, example.targets) == ({"input": "a", "id": "7"}, ["b"])


def test_an_empty_target_cell_is_an_unlabeled_test_example_and_an_error_in_train(tmp_path):
    rows = [["text", "label"], ["a", "big"], ["b", ""]]
    write_task(tmp_path / "mine", MAPPING, {"test.csv": rows, "train.csv": rows})
    assert [e.targets for e in data.load_split("mine", tmp_path, "test")] == [["big"], []]
    with pytest.raises(DamagedFile, match=r"mine/train.csv:3: an empty column 'label'"):
        data.load_split("mine", tmp_path, "train")


# --- one line naming the file, line and column --------------------------------------------


def test_a_missing_column_names_file_line_and_column(tmp_path):
    write_task(tmp_path / "mine", MAPPING, {"train.csv": [["review", "label"], ["a", "big"]]})
    with pytest.raises(DamagedFile) as err:
        data.load_split("mine", tmp_path, "train")
    message = str(err.value)
    assert "\n" not in message
    assert f"{tmp_path / 'mine/train.csv'}:2: no column 'text' for the template's {{text}}" in (
        message
    )
    assert "the example has 'review', 'label'" in message


def test_a_mapped_column_that_is_missing_says_task_json_mapped_it(tmp_path):
    spec = {"fields": {"input": "review"}}
    write_task(tmp_path / "mine", spec, {"train.csv": [["text", "target"], ["a", "b"]]})
    with pytest.raises(DamagedFile, match=r"train.csv:2: no column 'review' for the .*\{input\}"):
        data.load_split("mine", tmp_path, "train")


def test_a_row_with_too_few_values_names_the_line_it_starts_on(tmp_path):
    folder = write_task(tmp_path / "mine", MAPPING, {})
    (folder / "train.csv").write_text('text,label\n"two\nlines",big\nshort\n', encoding="utf-8")
    with pytest.raises(DamagedFile, match=r"train.csv:4: 1 values for the 2 columns of line 1"):
        data.load_split("mine", tmp_path, "train")


@pytest.mark.parametrize(
    "header, words",
    [
        ("", "no header row"),
        ("text,,label", "column 2 has no name"),
        ("a,a", "column 'a' appears twice"),
    ],
)
def test_a_bad_header_row_is_named(tmp_path, header, words):
    folder = write_task(tmp_path / "mine", MAPPING, {})
    (folder / "train.csv").write_text(header + "\nx,y,z\n", encoding="utf-8")
    with pytest.raises(DamagedFile, match=rf"train.csv:1: {words}"):
        data.load_split("mine", tmp_path, "train")


def test_non_utf8_bytes_in_a_csv_name_the_line(tmp_path):
    folder = write_task(tmp_path / "mine", MAPPING, {})
    (folder / "train.csv").write_bytes(b"text,label\nok,big\ncaf\xe9,big\n")
    with pytest.raises(DamagedFile, match=r"train.csv:3: not UTF-8 text \(byte 0xe9"):
        data.load_split("mine", tmp_path, "train")


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"question": "text"}, "fields maps 'question', which the template does not name"),
        ({"text": 3}, "fields is "),
        (["text"], "fields is "),
    ],
)
def test_task_json_fields_that_cannot_apply_are_refused(tmp_path, fields, words):
    write_task(tmp_path / "mine", {"template": TEMPLATE, "fields": fields}, {})
    with pytest.raises(BadInput, match=words):
        data.load_task("mine", tmp_path)


# --- two files for one split ----------------------------------------------------------------


def test_two_files_for_one_split_are_refused_in_one_line_naming_both(tmp_path):
    folder = write_task(tmp_path / "mine", MAPPING, {"train.csv": [["text", "label"]]})
    (folder / "train.jsonl").write_text('{"text": "a", "label": "big"}\n', encoding="utf-8")
    with pytest.raises(BadInput) as err:
        data.load_split("mine", tmp_path, "train")
    message = str(err.value)
    assert "\n" not in message and "train.jsonl and train.csv are files of one split" in message


def test_a_paper_task_folder_reads_no_csv_and_says_what_it_found(tmp_path):
    write_table(tmp_path / "rte/train.csv", [["premise", "hypothesis", "label"], ["p", "h", "0"]])
    missing = data.read_split("rte", tmp_path, "train")
    assert isinstance(missing, dataset_files.NoSplitFile)
    assert missing.message.endswith("; the folder holds train.csv")
    assert "train.jsonl, train.json, or parquet" in missing.message


# --- every "not found" names what it found ----------------------------------------------------


def test_no_file_for_a_split_names_the_files_found_and_the_accepted_names(tmp_path):
    folder = write_task(tmp_path / "mine", MAPPING, {})
    (folder / "train.xlsx").write_bytes(b"PK")
    with pytest.raises(BadInput) as err:
        data.load_split("mine", tmp_path, "train")
    message = str(err.value)
    assert "no file for split 'train'; accepted names: train.jsonl, train.json, train.csv, " in (
        message
    )
    assert message.endswith("the folder holds task.json, train.xlsx")


def test_a_missing_task_folder_names_the_folders_present(tmp_path):
    write_task(tmp_path / "mine", MAPPING, {})
    with pytest.raises(BadInput, match=r"cb: folder not found \(.* holds mine/\); put the cb"):
        data.load_split("cb", tmp_path, "validation")


def test_an_unknown_task_gets_a_did_you_mean_over_the_folders_present(tmp_path):
    write_task(tmp_path / "sentiment", MAPPING, {})
    (tmp_path / "notes").mkdir()
    with pytest.raises(BadInput) as err:
        data.register_tasks(["sentimnt"], tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"unknown task 'sentimnt'; known tasks: sentiment (folders in {tmp_path})"
    )
    assert f"{tmp_path}/notes/: no task.json" in message
    assert f"a task of your own is a folder {tmp_path}/<name>/ with a task.json" in message
    assert message.endswith("did you mean 'sentiment'?")


def test_a_near_miss_of_a_folder_without_task_json_is_offered_and_its_lack_named(tmp_path):
    (tmp_path / "reviews").mkdir()
    write_table(tmp_path / "reviews/train.csv", [["text", "label"]])
    with pytest.raises(BadInput) as err:
        data.get_task("review", tmp_path)
    message = str(err.value)
    assert f"{tmp_path}/reviews/: no task.json" in message
    assert message.endswith("did you mean 'reviews'?")


def test_several_unknown_tasks_get_one_guess_each(tmp_path):
    for name in ("sentiment", "topics"):
        write_task(tmp_path / name, MAPPING, {})
    with pytest.raises(BadInput, match=r"did you mean 'sentiment' for 'sentimnt', 'topics' for "):
        data.register_tasks(["sentimnt", "topic", "zzz"], tmp_path)


def test_data_check_with_no_task_folders_names_the_files_and_what_a_task_needs(tmp_path, capsys):
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews.csv").write_text("text,label\n", encoding="utf-8")
    assert data.main(["check", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"data.py: error: {tmp_path}: no task folders found; it holds reviews/ (no task.json), "
        "reviews.csv; a task of your own is a folder"
    )


def test_data_check_counts_a_csv_task_and_warns_of_a_folder_without_task_json(tmp_path, capsys):
    write_task(tmp_path / "mine", MAPPING, {"train.csv": [["text", "label"], ["a", "big"]]})
    (tmp_path / "mine/dev.tsv").write_text("text\tlabel\na\tbig\nb\tsmall\n", encoding="utf-8")
    (tmp_path / "notes").mkdir()
    assert data.main(["check", "--data-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "mine            train 1, validation 2, test -" in captured.out
    assert f"warning: {tmp_path}/notes/: no task.json, so not a task" in captured.err


# --- end to end: a CSV task through stage 1 and evaluate.py -----------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    spiece = pf.make_spiece(str(d / "spiece"))
    data_dir = pf.make_data_dir(str(d / "data"), n_train=8, n_val=4)  # toy_tf, toy_copy
    rng = random.Random(3)

    def rows(n):
        texts = [" ".join(rng.choice(pf.WORDS[:10]) for _ in range(5)) for _ in range(n)]
        texts[0] = "the cat, the dog\nsat on the mat"  # a comma and a newline, quoted
        return [["text", "label"]] + [[t, "big" if "big" in t else "small"] for t in texts]

    spec = {**MAPPING, "label_words": ["big", "small"]}
    write_task(d / "data/sizes", spec, {"train.csv": rows(24), "validation.csv": rows(6)})
    return dict(model=pf.make_model_dir(str(d / "model"), spiece), data=data_dir, root=d)


def test_a_csv_task_trains_stage_1_and_is_scored_by_evaluate(env, tmp_path):
    out = tmp_path / "run"
    argv = ["--stage", "1", "--model", env["model"], "--data-dir", env["data"], "--task", "sizes"]
    argv += ["--out", str(out), "--steps", "2", "--save-every", "2", "--batch-size", "4"]
    argv += ["--prompt-length", "5", "--no-eval"]
    assert promot.main(argv) == 0
    prompt = out / "stage1" / "best" / "prompt.safetensors"
    assert prompt.is_file()

    results = tmp_path / "results.json"
    argv = ["--model", env["model"], "--data-dir", env["data"], "--out", str(results)]
    argv += ["--prompt", str(prompt), "--eval-tasks", "toy_copy", "--shots", "0"]
    argv += ["--eval-examples", "6", "--num-beams", "2", "--max-new-tokens", "4"]
    assert evaluate.main(argv) == 0
    runs = {r["task"]: r for r in json.loads(results.read_text())["runs"]}
    assert set(runs) == {"sizes", "toy_copy"} and runs["sizes"]["role"] == "fine-tuned"

    # The oracle: the rows as Python's csv module reads the file, through the template.
    with open(env["root"] / "data/sizes/validation.csv", newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    run = runs["sizes"]
    assert [(ex["input"], ex["references"]) for ex in run["examples"]] == [
        (TEMPLATE.format(text=row["text"]) + " <extra_id_0>", [row["label"]]) for row in written
    ]
    predictions = [ex["prediction"] for ex in run["examples"]]
    references = [ex["references"] for ex in run["examples"]]
    assert run["score"] == pytest.approx(
        evaluate.compute_metric("accuracy", predictions, references)
    )


def test_a_stage_export_is_scored_without_out_into_its_stage_folder(env, tmp_path, capsys):
    """evaluate.py --model RUN/stage2/best writes RUN/stage2/eval.json and says so; a model that
    is no stage export still needs --out."""
    out = tmp_path / "run"
    argv = ["--model", env["model"], "--data-dir", env["data"], "--task", "sizes"]
    argv += ["--out", str(out), "--steps", "2", "--save-every", "2", "--batch-size", "4"]
    argv += ["--prompt-length", "5", "--no-eval"]
    assert promot.main(["--stage", "1", *argv]) == 0 and promot.main(["--stage", "2", *argv]) == 0
    scoring = ["--data-dir", env["data"], "--eval-tasks", "toy_copy", "--shots", "0"]
    scoring += ["--eval-examples", "2", "--num-beams", "1", "--max-new-tokens", "2"]
    capsys.readouterr()
    assert evaluate.main(["--model", str(out / "stage2" / "best"), *scoring]) == 0
    written = out / "stage2" / "eval.json"
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(str(written))
    assert {r["task"] for r in json.loads(written.read_text())["runs"]} == {"sizes", "toy_copy"}
    assert evaluate.main(["--model", env["model"], *scoring]) == 2
    assert "required: --out" in capsys.readouterr().err


def test_a_misspelt_own_task_stops_promot_in_one_line_with_a_guess(env, tmp_path, capsys):
    argv = ["--stage", "1", "--model", env["model"], "--data-dir", env["data"], "--task", "size"]
    assert promot.main(argv + ["--out", str(tmp_path / "run"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promot.py: error: unknown task 'size'; known tasks: sizes, toy_copy")
    assert err.count("\n") == 1 and err.rstrip().endswith("did you mean 'sizes'?")
