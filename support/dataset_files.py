"""Readers of each data set's published file layout, for promot's twelve tasks.

This leaf turns the files a user downloads -- a `datasets` export
(`Dataset.to_json`, JSON Lines) or the data set's own release -- into plain
records. A reader is `reader(data_dir, split) -> list[(fields, targets)]`:
`fields` is a dict of the text fields a prompt template names, `targets` the
reference answers (targets[0] is the training target; [] for an unlabeled
example, e.g. a hidden test split). It holds
  * the low-level readers: `read_lines`, `read_jsonl`, `read_json`;
  * field access with clear errors: `get_field`, `get_text`, `label_word`;
  * file finding: `SPLIT_STEMS`, `task_folder`, `find_file`, `jsonl_names`;
  * one reader per data set (SuperGLUE RTE/CB/WiC, SNLI, OpenBookQA, TriviaQA,
    WebQuestions, WMT, XSum, WikiLingua) and the generic JSONL task.
Every user-caused problem becomes one `DataError` naming the file, the line
and what was expected. It imports only the standard library, nothing of the
project, so it can be copied alone into another codebase; data.py turns the
records into its Examples and prompts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


class DataError(ValueError):
    """A problem with the user's data or arguments; the message names the file,
    the line and what was expected."""


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------

def read_lines(path):
    """Yield (line number, text) of a UTF-8 file, naming the line of any bad byte."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} "
                                f"at column {err.start + 1})") from None


def read_jsonl(path):
    """Yield (line number, object) for each non-blank line of a JSON Lines file
    (`path` a str or Path); a DataError names path:line of bad JSON, non-UTF-8
    bytes or a value that is not a JSON object."""
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def read_json(path):
    """Load a whole JSON file (TriviaQA's and WebQuestions' releases)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text "
                        f"(byte {raw[err.start]:#04x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None


_MISSING = object()


def get_field(record: dict, dotted: str, where: str, default=_MISSING):
    """record["a"]["b"] for dotted "a.b"; a DataError naming the field and place if absent."""
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            if default is not _MISSING:
                return default
            raise DataError(f"{where}: missing field {dotted!r}")
        value = value[key]
    return value


def get_text(record: dict, dotted: str, where: str) -> str:
    value = get_field(record, dotted, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {dotted!r} should be a string, got {json.dumps(value)[:40]}")
    return value


def label_word(value, mapping: dict, where: str, field_name: str = "label") -> str:
    # bool is checked apart because True == 1 for a dict lookup.
    key = ("bool", value) if isinstance(value, bool) else value
    if key not in mapping:
        accepted = ", ".join(json.dumps(k[1] if isinstance(k, tuple) else k) for k in mapping)
        raise DataError(f"{where}: {field_name} {json.dumps(value)} is not one of {accepted}")
    return mapping[key]


# --------------------------------------------------------------------------
# Finding a split's file: <data_dir>/<task name>/<split stem>.jsonl
# --------------------------------------------------------------------------

# Accepted file stems per split: `datasets` exports use train/validation/test,
# SuperGLUE's release uses val, others dev.
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "val", "dev"), "test": ("test",)}


def task_folder(data_dir, name) -> Path:
    folder = Path(data_dir) / name
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; put the {name} files there "
                        "(README, section 'Data sets')")
    return folder


def find_file(folder: Path, names, split: str) -> Path:
    """The first of `names` present in `folder`, else a DataError listing them all."""
    path = find_file_or_none(folder, names)
    if path is None:
        _missing(folder, split, names)
    return path


def find_file_or_none(folder: Path, names):
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _missing(folder: Path, split: str, names):
    raise DataError(f"{folder}: no file for split {split!r}; accepted names: {', '.join(names)}")


def jsonl_names(split: str, stems=None) -> list[str]:
    stems = stems or SPLIT_STEMS.get(split, (split,))
    return [f"{stem}{ext}" for stem in stems for ext in (".jsonl", ".json")]


def read_jsonl_split(name: str, data_dir, split: str, convert, stems=None) -> list[tuple[dict, list]]:
    """Read <data_dir>/<name>/<split>.jsonl with `convert(record, where, split)`, which
    returns (fields, targets) or None to drop the record."""
    path = find_file(task_folder(data_dir, name), jsonl_names(split, stems), split)
    examples = []
    for lineno, record in read_jsonl(path):
        example = convert(record, f"{path}:{lineno}", split)
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples in split {split!r}")
    return examples


# --------------------------------------------------------------------------
# One reader per data set
# --------------------------------------------------------------------------

# Label values -> Table 7 answer words. `datasets` exports store class ids
# (super_glue rte: 0 entailment, 1 not_entailment; cb: 0 entailment,
# 1 contradiction, 2 neutral; wic: 0 different, 1 same sense; snli: 0 entailment,
# 1 neutral, 2 contradiction), the official releases store names or booleans.
RTE_LABELS = {0: "True", 1: "False", "entailment": "True", "not_entailment": "False"}
CB_LABELS = {0: "True", 1: "False", 2: "Neither",
             "entailment": "True", "contradiction": "False", "neutral": "Neither"}
WIC_LABELS = {0: "False", 1: "True", ("bool", False): "False", ("bool", True): "True"}
SNLI_LABELS = {0: "True", 1: "Neither", 2: "False",
               "entailment": "True", "neutral": "Neither", "contradiction": "False"}


def _label_targets(record, key, mapping, where, split):
    """[answer word], or [] for an unlabeled test example (-1 in `datasets` exports,
    no label field in the SuperGLUE release)."""
    value = record.get(key, _MISSING)
    if value is _MISSING and split != "test":
        raise DataError(f"{where}: missing field {key!r}")
    if value is _MISSING or value == -1:
        return []
    return [label_word(value, mapping, where, key)]


def superglue_reader(name: str, text_fields: tuple, mapping: dict):
    """RTE, CB, WiC: `datasets` export or SuperGLUE's own jsonl (same field names,
    string/boolean labels, val.jsonl for the dev split)."""
    def convert(record, where, split):
        fields = {f: get_text(record, f, where) for f in text_fields}
        return fields, _label_targets(record, "label", mapping, where, split)

    return lambda data_dir, split: read_jsonl_split(name, data_dir, split, convert)


def snli_reader(data_dir, split):
    """SNLI: `datasets` export (premise/hypothesis/label, -1 = no gold label) or the
    official snli_1.0_*.jsonl (sentence1/sentence2/gold_label, "-" = no gold label).
    Examples without a gold label are dropped, as everyone does."""
    def convert(record, where, split):
        if "gold_label" in record:
            if record["gold_label"] == "-":
                return None
            fields = {"premise": get_text(record, "sentence1", where),
                      "hypothesis": get_text(record, "sentence2", where)}
            return fields, [label_word(record["gold_label"], SNLI_LABELS, where, "gold_label")]
        fields = {"premise": get_text(record, "premise", where),
                  "hypothesis": get_text(record, "hypothesis", where)}
        label = get_field(record, "label", where)
        return None if label == -1 else (fields, [label_word(label, SNLI_LABELS, where)])

    official = {"train": ("snli_1.0_train",), "validation": ("snli_1.0_dev",), "test": ("snli_1.0_test",)}
    stems = SPLIT_STEMS.get(split, (split,)) + official.get(split, ())
    return read_jsonl_split("snli", data_dir, split, convert, stems)


def openbookqa_reader(data_dir, split):
    """OpenbookQA: `datasets` export (question_stem, choices.{text,label}, answerKey)
    or the official Main/*.jsonl (question.{stem,choices[{text,label}]}, answerKey).
    The target is the answer's letter (the paper, App. C.1: "A", "B", "C", "D")."""
    def convert(record, where, split):
        if "question_stem" in record:
            stem = get_text(record, "question_stem", where)
            texts = get_field(record, "choices.text", where)
            labels = get_field(record, "choices.label", where)
        else:
            stem = get_text(record, "question.stem", where)
            choices = get_field(record, "question.choices", where)
            texts = [get_text(c, "text", where) for c in choices]
            labels = [get_text(c, "label", where) for c in choices]
        options = dict(zip(labels, texts))
        if sorted(options) != ["A", "B", "C", "D"]:
            raise DataError(f"{where}: expected choices labelled A, B, C, D, got {labels}")
        answer = get_field(record, "answerKey", where)
        fields = {"question": stem, **{f"option_{k.lower()}": v for k, v in options.items()}}
        return fields, [label_word(answer, {k: k for k in "ABCD"}, where, "answerKey")]

    return read_jsonl_split("openbookqa", data_dir, split, convert)


def _dedup(texts) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t))


TRIVIA_QA_OFFICIAL = {"train": ("web-train.json", "wikipedia-train.json"),
                      "validation": ("web-dev.json", "wikipedia-dev.json"),
                      "test": ("web-test-without-answers.json", "wikipedia-test-without-answers.json")}


def trivia_qa_reader(data_dir, split):
    """TriviaQA rc.nocontext: `datasets` export (question, answer.value,
    answer.aliases; hidden test answers are [] / "<unk>") or the official release's
    qa/{web,wikipedia}-<split>.json ({"Data": [{"Question", "Answer": {"Value",
    "Aliases"}}]}), both files concatenated as `datasets` does for rc.
    Targets: the answer value, then every alias (all count for exact match)."""
    folder = task_folder(data_dir, "trivia_qa")
    for official_dir in (folder / "qa", folder):
        files = [official_dir / n for n in TRIVIA_QA_OFFICIAL.get(split, ()) if (official_dir / n).is_file()]
        if files:
            return _trivia_qa_official(files, split)

    def convert(record, where, split):
        value = get_field(record, "answer.value", where)
        aliases = get_field(record, "answer.aliases", where)
        targets = _dedup([value] + list(aliases)) if value not in ("", "<unk>") else _dedup(aliases)
        return {"question": get_text(record, "question", where)}, targets

    if find_file_or_none(folder, jsonl_names(split)) is None:
        _missing(folder, split, jsonl_names(split) + [f"qa/{n}" for n in TRIVIA_QA_OFFICIAL.get(split, ())])
    return read_jsonl_split("trivia_qa", data_dir, split, convert)


def _trivia_qa_official(files, split):
    examples = []
    for path in files:
        records = get_field(read_json(path), "Data", f"{path}:1")
        for i, record in enumerate(records):
            where = f"{path}: Data[{i}]"
            answer = record.get("Answer")  # absent in the *-test-without-answers files
            if answer is None and split != "test":
                raise DataError(f"{where}: missing field 'Answer'")
            targets = [] if answer is None else _dedup(
                [get_text(answer, "Value", where)] + list(get_field(answer, "Aliases", where)))
            examples.append(({"question": get_text(record, "Question", where)}, targets))
    if not examples:
        raise DataError(f"{files[0].parent}: no examples in split {split!r}")
    return examples


_WEBQ_DESCRIPTION = re.compile(r'\(description (?:"((?:[^"\\]|\\.)*)"|([^()"]*))\)')


def parse_webquestions_target(target_value: str, where: str) -> list[str]:
    """'(list (description "Jazmine Sullivan") (description Ohio))' -> ['Jazmine Sullivan', 'Ohio']."""
    answers = [quoted.replace('\\"', '"') if quoted else bare.strip()
               for quoted, bare in _WEBQ_DESCRIPTION.findall(target_value)]
    if not target_value.startswith("(list") or not answers:
        raise DataError(f"{where}: targetValue {target_value[:60]!r} is not '(list (description ...) ...)'")
    return answers


def web_questions_reader(data_dir, split):
    """WebQuestions: `datasets` export (question, answers) or the official
    webquestions.examples.<split>.json, a JSON array of {utterance, targetValue}.
    There is no validation split (Table 8)."""
    folder = task_folder(data_dir, "web_questions")
    official = folder / f"webquestions.examples.{split}.json"
    if official.is_file():
        records = read_json(official)
        if not isinstance(records, list) or not records:
            raise DataError(f"{official}: expected a non-empty JSON array of questions")
        return [({"question": get_text(r, "utterance", f"{official}: [{i}]")},
                 parse_webquestions_target(get_text(r, "targetValue", f"{official}: [{i}]"),
                                           f"{official}: [{i}]"))
                for i, r in enumerate(records)]

    def convert(record, where, split):
        answers = get_field(record, "answers", where)
        if not isinstance(answers, list):
            raise DataError(f"{where}: field 'answers' should be a list of strings")
        return {"question": get_text(record, "question", where)}, _dedup(answers)

    if find_file_or_none(folder, jsonl_names(split)) is None:
        _missing(folder, split, jsonl_names(split) + [official.name])
    return read_jsonl_split("web_questions", data_dir, split, convert)


def translation_reader(name: str, source: str, target: str, official_stems: dict):
    """WMT: `datasets` export ({"translation": {"en": ..., "fr": ...}}) or two
    aligned plain-text files <stem>.<source> and <stem>.<target> (one sentence per
    line, e.g. newstest2014.en / newstest2014.fr as sacrebleu -- echo src/ref -- writes them)."""
    def convert(record, where, split):
        return ({"sentence": get_text(record, f"translation.{source}", where)},
                [get_text(record, f"translation.{target}", where)])

    def load(data_dir, split):
        folder = task_folder(data_dir, name)
        stems = SPLIT_STEMS.get(split, (split,)) + official_stems.get(split, ())
        if find_file_or_none(folder, jsonl_names(split, stems)):
            return read_jsonl_split(name, data_dir, split, convert, stems)
        for stem in stems:
            src, tgt = folder / f"{stem}.{source}", folder / f"{stem}.{target}"
            if src.is_file() and tgt.is_file():
                return _read_parallel(src, tgt, split)
        names = jsonl_names(split, stems) + [f"{s}.{source} + {s}.{target}" for s in stems]
        _missing(folder, split, names)

    return load


def _read_parallel(src: Path, tgt: Path, split: str) -> list[tuple[dict, list]]:
    sources = [line for _, line in read_lines(src)]
    targets = [line for _, line in read_lines(tgt)]
    if len(sources) != len(targets):
        raise DataError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; "
                        "the two files must be aligned line by line")
    if not sources:
        raise DataError(f"{src}: no examples in split {split!r}")
    return [({"sentence": s}, [t]) for s, t in zip(sources, targets)]


def xsum_reader(data_dir, split):
    """XSum: `datasets` export (document, summary, id)."""
    def convert(record, where, split):
        return {"article": get_text(record, "document", where)}, [get_text(record, "summary", where)]
    return read_jsonl_split("xsum", data_dir, split, convert)


def wiki_lingua_reader(data_dir, split):
    """WikiLingua English, GEM version (`datasets` GEM/wiki_lingua, english_en):
    source, target and, where present, references (all used for scoring)."""
    def convert(record, where, split):
        references = record.get("references") or []
        return ({"article": get_text(record, "source", where)},
                _dedup([get_text(record, "target", where)] + list(references)))
    return read_jsonl_split("wiki_lingua_en", data_dir, split, convert)


# --------------------------------------------------------------------------
# The generic JSONL task: any data set written as input/target lines
# --------------------------------------------------------------------------

def jsonl_task_reader(name: str):
    """Generic JSONL task: one {"input": ..., "target": ... | "targets": [...]} per line;
    every other top-level string field is available to the template too."""
    def convert(record, where, split):
        if "targets" in record:
            targets = record["targets"]
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise DataError(f"{where}: field 'targets' should be a list of strings")
        elif "target" in record:
            targets = [get_text(record, "target", where)]
        elif split == "test":
            targets = []
        else:
            raise DataError(f"{where}: missing field 'target' (or 'targets')")
        fields = {k: v for k, v in record.items() if k not in ("target", "targets") and isinstance(v, str)}
        get_text(record, "input", where)
        return fields, list(targets)

    return lambda data_dir, split: read_jsonl_split(name, data_dir, split, convert)


def read_task_json(path, accepted_keys, metrics) -> dict:
    """The settings of a generic task from its `task.json`: a JSON object whose keys
    are among `accepted_keys` and whose "metric", if given, is one of `metrics`."""
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a JSON object with keys {', '.join(accepted_keys)}")
    unknown = sorted(set(spec) - set(accepted_keys))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted_keys)}")
    if spec.get("metric", "exact_match") not in metrics:
        raise DataError(f"{path}: metric {spec['metric']!r} is not one of {', '.join(metrics)}")
    return spec
