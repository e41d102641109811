"""Readers of each data set's published file layout, for promot's twelve tasks.

This leaf turns the files a user downloads -- the Hub's parquet files, a
`datasets` export (`Dataset.to_json`, JSON Lines) or the data set's own
release -- into plain records. A reader is
`reader(data_dir, split) -> list[(fields, targets)]` (or a list-like
`LazySequence` of them): `fields` is a dict of the text fields a prompt
template names, `targets` the reference answers (targets[0] is the training
target; [] for an unlabeled example, e.g. a hidden test split). It holds
  * the low-level readers: `read_lines`, `read_jsonl`, `read_json`, `read_table` (CSV and
    TSV), `read_parquet` (pyarrow, optional, is imported only when a parquet file is met);
  * field access with clear errors: `get_field`, `get_text`, `label_word`;
  * reading only what the user named: plain task and split names, no symbolic link out
    of the folder (`check_links_inside`, also for checkpoint folders), and `in_split`, which
    puts the task and split in front of an error's message;
  * file finding: `SPLIT_STEMS`, `task_folder`, `split_files` (one JSONL file -- or CSV/TSV
    in a task folder of your own -- or parquet files and the Hub's shards), `read_split`,
    `unreadable_files` (for `data.py check`); every "not found" names what the folder holds
    (`folder_listing`), and an unknown task gets a "did you mean" (`unknown_tasks`);
  * large files without holding them: `LazySequence`, a list whose items are
    read on demand, and `indexed_lines`, a byte-offset index of a file's lines
    cached beside it (WMT14 En-Fr's 40.8M pairs would take ~30 GB as objects);
  * one reader per data set (SuperGLUE or GLUE RTE, CB, WiC, SNLI, OpenBookQA,
    TriviaQA, WebQuestions, WMT, XSum, WikiLingua) and the generic task (JSON Lines, CSV or
    TSV) with its task.json (`read_task_json`), whose "fields" may map template fields to
    columns.
Every user-caused problem is one `BadInput` (a folder or setting the user chose) or
`DamagedFile` (a file that does not hold what its format says), naming the file, the line
(or parquet row) and what was expected; a split with no file is not an error here but a
returned `NoSplitFile`. It imports only the standard library, support/errors.py (and pyarrow
when it meets a parquet file), so it can be copied with that one file into another codebase;
data.py turns the records into its Examples and prompts.
"""

from __future__ import annotations

import collections.abc
import contextlib
import csv
import difflib
import hashlib
import io
import json
import operator
import os
import re
import string
import struct
from dataclasses import dataclass
from pathlib import Path

from support.errors import BadInput, DamagedFile

try:
    import fcntl  # POSIX: one process builds an index while the others wait
except ImportError:
    fcntl = None


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------


def read_lines(path):
    """Yield (line number, text) of a UTF-8 file, naming the line of any bad byte."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, decode_line(path, lineno, raw)


def decode_line(path, lineno: int, raw: bytes) -> str:
    """One line's bytes as text, without its line end (nor the byte-order mark that Windows
    editors put before line 1)."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
        return text.removeprefix("\ufeff") if lineno == 1 else text
    except UnicodeDecodeError as err:
        raise DamagedFile(
            f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} "
            f"at column {err.start + 1})"
        ) from None


def read_jsonl(path):
    """Yield (line number, object) for each non-blank line of a JSON Lines file
    (`path` a str or Path); a DamagedFile names path:line of bad JSON, non-UTF-8
    bytes or a value that is not a JSON object."""
    for lineno, line in read_lines(path):
        record = parse_json_line(path, lineno, line)
        if record is not None:
            yield lineno, record


def parse_json_line(path, lineno: int, line: str) -> dict | None:
    """The JSON object on one line of a JSON Lines file; None for a blank line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DamagedFile(
            f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    except (ValueError, RecursionError) as err:  # a 5000-digit number, nesting too deep
        raise DamagedFile(f"{path}:{lineno}: unreadable JSON ({str(err)[:80]})") from None
    if not isinstance(record, dict):
        raise DamagedFile(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    check_surrogates(path, lineno, line, record)
    return record


# A high half (\\ud800-\\udbff) not followed by a low one, or a low half (\\udc00-\\udfff)
# not after a high one.
_LONE_SURROGATE = re.compile(
    r"\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f])|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2}", re.I
)


def check_surrogates(path, lineno, text: str, value) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800") with no other half: no Unicode
    text, and the tokenizer fails on it much later. Named here, with its line."""
    match = _LONE_SURROGATE.search(text)  # rare: only then is the parsed value checked
    if match:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            lineno = lineno or text.count("\n", 0, match.start()) + 1
            raise DamagedFile(
                f"{path}:{lineno}: a lone UTF-16 surrogate ({match[0]}) in a string; "
                "the text is not valid Unicode"
            ) from None


def read_json(path):
    """Load a whole JSON file (TriviaQA's and WebQuestions' releases)."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedFile(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    except (ValueError, RecursionError) as err:  # a 5000-digit number, nesting too deep
        raise DamagedFile(f"{path}: unreadable JSON ({str(err)[:80]})") from None
    check_surrogates(path, None, text, value)
    return value


def read_text(path) -> str:
    """A whole UTF-8 file as text, without a leading byte-order mark; a DamagedFile names the
    line of a byte that is not UTF-8."""
    raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        raise DamagedFile(f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x})") from None


TABLE_SUFFIXES = (".csv", ".tsv")  # read in a task folder of your own (one with a task.json)


class TableRow(dict):
    """One row of a CSV or TSV file, {column: text}: every value a string, an empty cell ""."""


def read_table(path):
    """Yield (line number, TableRow) for each row of a CSV file, or of a TSV file (a .tsv:
    tab-separated): a header row of column names, then one row per example; a quoted field may
    hold commas, tabs, doubled quotes and newlines, as Excel, pandas and Python's csv write it.
    The line number is where the row starts; blank lines are skipped. The file is read whole
    (a large data set is better written as JSON Lines, which is streamed)."""
    kind, dialect = ("TSV", "excel-tab") if Path(path).suffix == ".tsv" else ("CSV", "excel")
    rows = csv.reader(io.StringIO(read_text(path), newline=""), dialect)
    limit = csv.field_size_limit(1 << 30)  # the default, 131,072 characters, is one article
    try:
        header = [name.strip() for name in next(rows, [])]
        check_header(path, header)
        start = rows.line_num + 1
        for row in rows:
            lineno, start = start, rows.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise DamagedFile(
                    f"{path}:{lineno}: {len(row)} values for the {len(header)} columns of line 1 "
                    f"({', '.join(header)}); quote a value that holds a separator"
                )
            yield lineno, TableRow(zip(header, row))
    except csv.Error as err:
        raise DamagedFile(f"{path}:{rows.line_num}: malformed {kind} ({err})") from None
    finally:
        csv.field_size_limit(limit)


def check_header(path, header):
    """A header row names every column once."""
    if not any(header):
        raise DamagedFile(f"{path}:1: no header row; expected column names such as input,target")
    for i, name in enumerate(header):
        if not name:
            raise DamagedFile(f"{path}:1: column {i + 1} has no name in the header row")
        if name in header[:i]:
            raise DamagedFile(f"{path}:1: column {name!r} appears twice in the header row")


PYARROW_MISSING = (
    "reading parquet files needs the optional package pyarrow; "
    "install it with `pip install pyarrow`"
)


def read_parquet(path):
    """Yield (row number, record) for each row of a parquet file, the first row 1.
    Records are the dicts a `datasets` JSON export holds: structs become dicts, lists
    lists, class labels ints. pyarrow is imported here, when a parquet file is met."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise BadInput(f"{path}: {PYARROW_MISSING}") from None
    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=4096)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DamagedFile(f"{path}: not a readable parquet file ({err})") from None
    row = 0
    try:  # a valid footer over corrupt pages fails only here, as the pages are read
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as err:
        why = " ".join(str(err).split())  # pyarrow's messages span lines
        raise DamagedFile(f"{path}: row {row + 1}: unreadable parquet page ({why})") from None


_MISSING = object()


def get_field(record: dict, dotted: str, where: str, default=_MISSING):
    """record["a"]["b"] for dotted "a.b"; a DamagedFile naming the field and place if absent."""
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            if default is not _MISSING:
                return default
            raise DamagedFile(f"{where}: missing field {dotted!r}")
        value = value[key]
    return value


def get_text(record: dict, dotted: str, where: str) -> str:
    value = get_field(record, dotted, where)
    if not isinstance(value, str):
        raise DamagedFile(
            f"{where}: field {dotted!r} should be a string, got {json.dumps(value)[:40]}"
        )
    return value


def label_word(value, mapping: dict, where: str, field_name: str = "label") -> str:
    # bool is checked apart because True == 1 for a dict lookup.
    key = ("bool", value) if isinstance(value, bool) else value
    if key not in mapping:
        accepted = ", ".join(json.dumps(k[1] if isinstance(k, tuple) else k) for k in mapping)
        raise DamagedFile(f"{where}: {field_name} {json.dumps(value)} is not one of {accepted}")
    return mapping[key]


# --------------------------------------------------------------------------
# Reading only what the user named: plain task and split names, no link out of the
# folder, and every error naming its task and split
# --------------------------------------------------------------------------

PLAIN_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # a task or split name: never '..', '/x' or 'a/b'
MAX_NAME = 100  # characters of a task name (a folder, and a key in every results file)


def check_task_name(name):
    """A task name is a folder under --data-dir, never a path, and short enough to be one
    (a file system refuses a name over 255 bytes with a traceback, not a message)."""
    if not re.fullmatch(PLAIN_NAME, str(name)):
        raise BadInput(
            f"task name {str(name)[:MAX_NAME]!r}: expected letters, digits, '_', '-' and '.' "
            "(a folder under --data-dir), not a path"
        )
    if len(str(name)) > MAX_NAME:
        raise BadInput(
            f"task name {str(name)[:40]}... ({len(str(name))} characters): expected at most "
            f"{MAX_NAME}"
        )


def check_known_tasks(names, data_dir, known):
    """Every name of `names` is a plain task name (check_task_name), and one of the
    `known` tasks (data.TASKS) or a folder of `data_dir` with a task.json: every unknown one in
    one BadInput (data.register_tasks calls this for each command), not the first of them."""
    names = [n for n in names if isinstance(n, str)]  # a data.Task is known
    for name in names:
        check_task_name(name)
    unknown = [n for n in names if n not in known and not has_task_json(data_dir, n)]
    if unknown:
        raise BadInput(unknown_tasks(unknown, data_dir, known))


def has_task_json(data_dir, name):
    """Whether <data_dir>/<name>/task.json defines a task (data.load_task reads it)."""
    return data_dir is not None and os.path.isfile(os.path.join(data_dir, name, "task.json"))


# What a "not found" says a task of your own needs (docs/data.md, "Your own task").
TASK_FOLDER_NEEDS = (
    "a task of your own is a folder {data_dir}/<name>/ with a task.json and a file per split: "
    "train.jsonl, train.csv or train.tsv (validation and test likewise; docs/data.md)"
)


def unknown_tasks(unknown, data_dir, known):
    """The message that names the `unknown` task names, all of them, and what is known: the
    task folders of `data_dir` first, a folder without a task.json, what a task of your own
    needs, and a "did you mean" for a near miss (difflib, over the folders present first)."""
    folders = sorted(e.name for e in _entries(data_dir or "") if e.is_dir() and e.name[:1] != ".")
    present = [n for n in folders if n in known or has_task_json(data_dir, n)]
    bare, absent = [n for n in folders if n not in present], sorted(set(known) - set(present))
    listed = f"{', '.join(present)} (folders in {data_dir}); " if present else ""
    where = f" (no folder in {data_dir})" if data_dir and absent else ""
    message = (
        f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
        f"known tasks: {listed}{', '.join(absent)}{where}"
    )
    if bare:
        message += f"; {', '.join(f'{data_dir}/{n}/' for n in bare)}: no task.json"
    if data_dir:
        message += "; " + TASK_FOLDER_NEEDS.format(data_dir=data_dir)
    guesses = {n: near_miss(n, present + bare, absent) for n in unknown}
    guesses = {n: g for n, g in guesses.items() if g}
    if len(unknown) == 1 and guesses:
        message += f"; did you mean {guesses[unknown[0]]!r}?"
    elif guesses:
        message += "; did you mean " + ", ".join(f"{g!r} for {n!r}" for n, g in guesses.items())
    return message


def near_miss(name, folders, others):
    """The name closest to a misspelt `name` (difflib's ratio >= 0.6): a folder present, else
    another known task; None when nothing is close."""
    for names in (folders, others):
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            return close[0]
    return None


def check_split_name(split, where):
    """A split is a plain name like a task's (its file is <task folder>/<split>.jsonl), never a
    path such as '../x'; `where` names its source (a task.json key, a flag)."""
    if not isinstance(split, str) or not re.fullmatch(PLAIN_NAME, split) or len(split) > MAX_NAME:
        raise BadInput(
            f"{where} is {json.dumps(split)[:MAX_NAME]}; expected a split name such as "
            f"\"validation\" (letters, digits, '_', '-' and '.', at most {MAX_NAME}), not a path"
        )


def check_split_files(data_dir, task_name, split):
    """Before a split of the task folder <data_dir>/<task_name>/ is read: a plain split name
    (check_split_name) and no link out of --data-dir (check_links_inside)."""
    check_split_name(split, f"task {task_name}: split")
    check_links_inside(os.path.join(data_dir, task_name), data_dir, "--data-dir")


def check_links_inside(folder, root, flag):
    """The symbolic links among `folder`'s entries and its sub-folders' entries (every file a
    reader opens: a task folder's splits, a checkpoint folder's files), and `folder` itself,
    point inside `root`, the folder the user named with `flag`. A Hugging Face cache snapshot
    (.../snapshots/<hash>/, files linked to ../../blobs/) may point into its repository's blobs."""
    named, root = root, os.path.realpath(root)
    allowed = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    entries = [folder] if os.path.islink(folder) else []
    for place in [folder] + [e.path for e in _entries(folder) if e.is_dir(follow_symlinks=False)]:
        entries += [e.path for e in _entries(place) if e.is_symlink()]
    for link in entries:
        target = os.path.realpath(link)
        if not any(os.path.commonpath([target, a]) == a for a in allowed):
            raise BadInput(
                f"{flag} {named}: {link} is a link to {target}, outside the folder; promot reads "
                f"only files inside the folders named on its command line (copy the file in)"
            )


def _entries(folder):
    try:
        with os.scandir(folder) as found:
            return list(found)
    except OSError:  # not a folder, or unreadable: nothing to follow
        return []


class in_split:  # noqa: N801 (used like a function: `with in_split(task, split):`)
    """Re-raises a BadInput or DamagedFile with "task T, split S: " in front (in place of a
    "task T: " it starts with), so that every data error names its task and split; one that
    starts with its --flag keeps it first."""

    def __init__(self, task_name, split):
        self.task, self.split = f"task {task_name}", f", split {split}: "

    def __enter__(self):
        return self

    def __exit__(self, kind, err, trace):
        message, named = str(err), (self.task + ", ", "--")  # a message led by its flag keeps it
        if not isinstance(err, (BadInput, DamagedFile)) or message.startswith(named):
            return False
        message = message.removeprefix(self.task + ": ")
        raise type(err)(self.task + self.split + message).with_traceback(trace) from None


# --------------------------------------------------------------------------
# Finding a split's file: <data_dir>/<task name>/<split stem>.jsonl
# --------------------------------------------------------------------------

# Accepted file stems per split: `datasets` exports use train/validation/test,
# SuperGLUE's release uses val, others dev.
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "val", "dev"), "test": ("test",)}


def task_folder(data_dir, name) -> Path:
    folder = Path(data_dir) / name
    if not folder.is_dir():
        holds = f" ({data_dir} holds {folder_listing(data_dir)})" if Path(data_dir).is_dir() else ""
        raise BadInput(
            f"{folder}: folder not found{holds}; put the {name} files there (docs/data.md)"
        )
    return folder


def folder_listing(folder, known=(), most=12) -> str:
    """What a "not found" message shows of `folder`: its files and sub-folders ("train.xlsx,
    notes/"), hidden ones left out, at most `most` named; a sub-folder that is neither one of
    the `known` tasks nor holds a task.json is marked so when `known` is given."""
    entries = sorted((e for e in _entries(folder) if e.name[:1] != "."), key=lambda e: e.name)
    if not entries:
        return "nothing"
    names = []
    for entry in entries[:most]:
        name = entry.name + ("/" if entry.is_dir() else "")
        bare = known and entry.is_dir() and entry.name not in known
        names.append(
            name + (" (no task.json)" if bare and not has_task_json(folder, entry.name) else "")
        )
    more = f" and {len(entries) - most} more" if len(entries) > most else ""
    return ", ".join(names) + more


@dataclass(frozen=True)
class NoSplitFile:
    """What a reader returns when a task folder holds no file for a split: `message` names the
    file names it accepts. data.load_split raises it as a BadInput; `data.py check` prints "-"."""

    message: str


def one_file_or_none(folder: Path, names):
    """The one file of `names` in `folder`, None if there is none; two are refused, naming both,
    rather than one read and the other silently left out."""
    found = [folder / n for n in names if (folder / n).is_file()]
    if len(found) > 1:
        raise BadInput(
            f"{folder}: {' and '.join(p.name for p in found)} are files of one split; "
            "keep one (rename or move the other)"
        )
    return found[0] if found else None


def no_split_file(folder: Path, split: str, stems=None, also=(), tables=False) -> NoSplitFile:
    stems = stems or SPLIT_STEMS.get(split, (split,))
    parquet = (
        f"{stems[0]}.parquet, {stems[0]}-00000-of-0000N.parquet or {stems[0]}/*.parquet, "
        "also in a sub-folder such as data/"
    )
    return NoSplitFile(
        f"{folder}: no file for split {split!r}; accepted names: "
        f"{', '.join(single_file_names(split, stems, tables) + list(also))}, or parquet: "
        f"{parquet}; the folder holds {folder_listing(folder)}"
    )


def single_file_names(split: str, stems=None, tables=False) -> list[str]:
    """The names of a split held in one file: JSON Lines (.jsonl, or the .json of a `datasets`
    export), and with `tables` (a task folder of your own) CSV and TSV."""
    stems = stems or SPLIT_STEMS.get(split, (split,))
    suffixes = (".jsonl", ".json") + (TABLE_SUFFIXES if tables else ())
    return [f"{stem}{ext}" for stem in stems for ext in suffixes]


# The Hub's shards: <split>-00000-of-00003.parquet (older uploads add -<hash>).
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[0-9a-f]+)?\.parquet")


def parquet_files(directory: Path, stem: str) -> list[Path]:
    """The parquet files of one split stem directly in `directory`, in reading order:
    <stem>.parquet; or every shard <stem>-NNNNN-of-MMMMM.parquet (all M must be
    there); or <stem>/*.parquet, the layout of the Hub's refs/convert/parquet
    branch; or that branch's older <dataset>-<stem>.parquet (xsum-train.parquet).
    [] when there are none."""
    if (directory / f"{stem}.parquet").is_file():
        return [directory / f"{stem}.parquet"]
    shards = {}
    for path in directory.glob("*-of-*.parquet"):
        match = _SHARD.fullmatch(path.name)
        if match and match["stem"] == stem:
            shards[int(match["index"])] = (path, int(match["count"]))
    if shards:
        expected = max(count for _, count in shards.values())
        absent = [
            f"{stem}-{i:05d}-of-{expected:05d}.parquet" for i in range(expected) if i not in shards
        ]
        if absent or any(count != expected for _, count in shards.values()):
            raise DamagedFile(
                f"{directory}: split {stem!r} is sharded into {expected} files, but "
                + (
                    f"{len(absent)} of them missing ({', '.join(absent[:3])})"
                    if absent
                    else "the shards disagree on how many there are"
                )
            )
        return [shards[i][0] for i in sorted(shards)]
    if (directory / stem).is_dir():
        return sorted((directory / stem).glob("*.parquet"))
    named = sorted(directory.glob(f"*-{stem}.parquet"))
    if len(named) > 1:
        raise BadInput(
            f"{directory}: several files for split {stem!r} "
            f"({', '.join(p.name for p in named)}); keep one"
        )
    return named


def split_files(folder: Path, split: str, stems=None, tables=False) -> list[Path]:
    """The files of one split in a task folder, in reading order ([] if none):
    one <stem>.jsonl / <stem>.json (a `datasets` export), or with `tables` <stem>.csv /
    <stem>.tsv (two of these are refused), else parquet files as `parquet_files` finds them,
    in the folder itself or in one sub-folder: `data/` (the Hub's layout) or a config folder
    such as `rte/` (what `hf download ... --include "rte/*"` writes)."""
    stems = stems or SPLIT_STEMS.get(split, (split,))
    single = one_file_or_none(folder, single_file_names(split, stems, tables))
    if single is not None:
        return [single]
    for stem in stems:
        files = parquet_files(folder, stem)
        if files:
            return files
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for stem in stems:
            files = parquet_files(sub, stem)
            if files:
                found[sub.name] = files
                break
    if len(found) > 1:
        raise BadInput(
            f"{folder}: split {split!r} is in several sub-folders ({', '.join(found)}); keep one"
        )
    return next(iter(found.values()), [])


def read_records(path: Path):
    """Yield (where, record) for each record of a JSON Lines, CSV, TSV or parquet file;
    `where` names the file and its line (path:7) or row (path: row 7, the first row is 1)."""
    if path.suffix == ".parquet":
        for row, record in read_parquet(path):
            yield f"{path}: row {row}", record
    else:
        read = read_table if path.suffix in TABLE_SUFFIXES else read_jsonl
        for lineno, record in read(path):
            yield f"{path}:{lineno}", record


def read_split(name: str, data_dir, split: str, convert, stems=None, also=(), tables=False):
    """Read one split of <data_dir>/<name>/ (see `split_files`; `tables`: CSV and TSV too) with
    `convert(record, where, split)`, which returns (fields, targets) or None to drop
    the record. `also` lists further accepted names for the NoSplitFile returned when none is there.
    A large JSON Lines file comes back as a LazySequence read on demand (`indexed_jsonl`),
    anything else as a list."""
    folder = task_folder(data_dir, name)
    paths = split_files(folder, split, stems, tables)
    if not paths:
        return no_split_file(folder, split, stems, also, tables)
    if paths[0].suffix in (".jsonl", ".json") and paths[0].stat().st_size >= STREAM_MIN_BYTES:
        examples = indexed_jsonl(paths[0], convert, split)
    else:  # parquet, CSV, TSV, and files small enough to hold: read whole
        examples = [
            example
            for path in paths
            for where, record in read_records(path)
            if (example := convert(record, where, split)) is not None
        ]
    if not examples:
        raise DamagedFile(
            f"{paths[0] if len(paths) == 1 else folder}: no examples in split {split!r}"
        )
    return examples


# --------------------------------------------------------------------------
# Large files: a byte-offset index, records read on demand
# --------------------------------------------------------------------------

# WMT14 En-Fr's train.jsonl holds 40.8M pairs (~15 GB): as Python objects that is
# ~30 GB on every rank. Instead one pass checks every line (raising the errors that
# reading the file whole raises) and writes where each kept line starts; a record
# is then read, parsed and converted only when it is asked for, so memory does not
# grow with the file. The index is built once and reused until the file changes.

# Files at least this large are indexed and streamed; smaller ones (every validation and test
# split of the paper, the lab's data) are read whole, as before, and leave no index behind.
STREAM_MIN_BYTES = 32 << 20


class LazySequence(collections.abc.Sequence):
    """A read-only list whose item i is `item(i)`, computed on each access, so that it
    holds nothing itself. A slice is a list; `map` gives another lazy view."""

    def __init__(self, length: int, item):
        self._length, self._item = length, item

    def __len__(self):
        return self._length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(self._length))]
        i = operator.index(i)
        if not -self._length <= i < self._length:
            raise IndexError(f"index {i} out of range for {self._length} items")
        return self._item(i % self._length)

    def __eq__(self, other):
        return (
            isinstance(other, collections.abc.Sequence)
            and len(self) == len(other)
            and all(a == b for a, b in zip(self, other))
        )

    def __repr__(self):
        return f"LazySequence({self._length} items)"

    def map(self, function) -> LazySequence:
        return LazySequence(self._length, lambda i: function(self._item(i)))


def indexed_jsonl(path: Path, convert, split: str) -> LazySequence:
    """The records of a JSON Lines file as `convert(record, where, split)` makes them,
    read on demand through `indexed_lines`. Blank lines and records that `convert`
    drops (returns None for) are not in the index."""

    def record(lineno, raw):
        found = parse_json_line(path, lineno, decode_line(path, lineno, raw))
        return None if found is None else convert(found, f"{path}:{lineno}", split)

    lines = indexed_lines(
        path,
        f"jsonl {split} {code_fingerprint(convert)}",
        lambda lineno, raw: record(lineno, raw) is not None,
    )
    return lines.map(lambda line: record(*line))


INDEX_FORMAT = "promot line index 1"
_ENTRY = struct.Struct("<QII")  # one kept line: byte offset, byte length, line number (from 1)
_HEADER_BYTES = 4096  # the index file: a JSON header padded with spaces, then the entries


def indexed_lines(path, key: str, keep) -> LazySequence:
    """The lines of a file for which `keep(line number, bytes)` is true, as a
    LazySequence of (line number, bytes); each item costs one read of the file.

    The first call reads the file once, calling `keep` on every line (which raises
    for a bad line), and writes the kept lines' offsets to an index: a hidden file
    beside the data file, or under ~/.cache/promot/indexes if that folder is not
    writable. The index records `key` (what `keep` selects) and the file's size,
    modification time and a hash of its first and last 64 KiB: another key or a
    changed file gets a new index, and a read after the file changed raises, never
    reading at a stale offset. It is written to a temporary file and renamed; under
    torchrun one process builds it while the others wait on a lock."""
    path = Path(path)
    data = open(path, "rb", buffering=0)
    signature = file_signature(data)
    candidates = index_paths(path, key)
    found = next(((p, h) for p in candidates if (h := _read_header(p, key, signature))), None)
    index, header = found or _build_index(path, data, key, keep, signature, candidates)
    entries = open(index, "rb", buffering=0)

    def line(i):
        offset, length, lineno = _ENTRY.unpack(
            os.pread(entries.fileno(), _ENTRY.size, _HEADER_BYTES + i * _ENTRY.size)
        )
        raw, now = os.pread(data.fileno(), length, offset), os.fstat(data.fileno())
        if (now.st_size, now.st_mtime_ns) != (signature["size"], signature["mtime_ns"]) or len(
            raw
        ) != length:
            raise DamagedFile(
                f"{path} changed after its index {index} was built; run again to re-index it"
            )
        return lineno, raw

    return LazySequence(header["count"], line)


def file_signature(file) -> dict:
    """What tells an open file's content apart, cheaply: size, modification time and a
    hash of its first and last 64 KiB (all of a small file)."""
    stat, fd = os.fstat(file.fileno()), file.fileno()
    ends = os.pread(fd, 1 << 16, 0) + os.pread(fd, 1 << 16, max(0, stat.st_size - (1 << 16)))
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ends": hashlib.sha1(ends).hexdigest(),
    }


def code_fingerprint(function) -> str:
    """A hash of the source file defining `function` and of the values its closure
    holds: what an index built with `function` depends on besides the data."""
    try:
        source = Path(function.__code__.co_filename).read_bytes()
    except OSError:
        source = function.__code__.co_code
    held = [
        getattr(c, "__qualname__", "") if callable(c) else c
        for c in (cell.cell_contents for cell in function.__closure__ or ())
    ]
    return hashlib.sha1(source + repr([function.__qualname__] + held).encode()).hexdigest()[:16]


def index_paths(path: Path, key: str) -> list[Path]:
    """Where the index of `path` for `key` is looked for and written, in that order."""
    name = f".{path.name}.{hashlib.sha1(key.encode()).hexdigest()[:12]}.index"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promot" / "indexes"
    return [
        path.parent / name,
        cache / (hashlib.sha1(str(path.absolute()).encode()).hexdigest()[:16] + name),
    ]


def _read_header(index: Path, key: str, signature: dict) -> dict | None:
    """The header of a usable index, else None: absent, for another key or file, cut short."""
    try:
        with open(index, "rb") as f:
            header = json.loads(f.read(_HEADER_BYTES))
        size = index.stat().st_size
    except (OSError, ValueError):
        return None
    usable = (
        isinstance(header, dict)
        and header.get("format") == INDEX_FORMAT
        and header.get("key") == key
        and header.get("file") == signature
        and isinstance(header.get("count"), int)
        and size == _HEADER_BYTES + header["count"] * _ENTRY.size
    )
    return header if usable else None


def _build_index(path, data, key, keep, signature, candidates) -> tuple[Path, dict]:
    failures = []
    for index in candidates:
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            with _folder_lock(index.parent):
                header = _read_header(index, key, signature)  # built by another process meanwhile?
                return index, header or _write_index(path, data, index, key, keep, signature)
        except OSError as err:  # a read-only folder: try the next place
            failures.append(f"{index.parent} ({err.strerror or err})")
    raise BadInput(f"{path}: cannot write its index in {' or in '.join(failures)}")


def _write_index(path, data, index: Path, key, keep, signature) -> dict:
    tmp = index.with_name(f"{index.name}.tmp-{os.getpid()}")
    try:
        with open(data.fileno(), "rb", closefd=False) as lines, open(tmp, "wb") as out:
            lines.seek(0)
            out.write(b" " * _HEADER_BYTES)
            offset, count = 0, 0
            for lineno, raw in enumerate(lines, 1):
                if keep(lineno, raw):
                    out.write(_ENTRY.pack(offset, len(raw), lineno))
                    count += 1
                offset += len(raw)
            if file_signature(data) != signature:
                raise DamagedFile(f"{path} changed while it was being indexed; run again")
            header = {"format": INDEX_FORMAT, "key": key, "file": signature, "count": count}
            out.seek(0)
            out.write(json.dumps(header).encode().ljust(_HEADER_BYTES - 1) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, index)
        return header
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Hold an exclusive flock on `folder`. Where locks are not supported, every
    process builds its own index, which the atomic rename keeps safe."""
    fd = os.open(folder, os.O_RDONLY) if fcntl else None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # and with it the lock


# What the readers here read; WMT's plain text is <stem>.<two-letter language>.
READABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
_LANGUAGE_SUFFIX = re.compile(r"\.[a-z]{2}")
_NAMES_A_SPLIT = re.compile(r"(?:^|[/._-])(?:train|validation|val|dev|test)(?:[/._-]|$)")


def unreadable_files(folder: Path, depth: int = 3, tables=False) -> list[Path]:
    """Files at most `depth` levels below a task folder whose path names a split
    (train, validation, val, dev, test) but whose format no reader here reads: the .arrow
    of `save_to_disk`, a .gz, and a .csv or .tsv unless `tables` (a task folder of your own).
    Hidden files and folders (the .cache/ that `hf download --local-dir` writes) are skipped."""
    readable = READABLE_SUFFIXES + (TABLE_SUFFIXES if tables else ())
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and len(here.parts) < depth - 1)
        for name in sorted(files):
            suffix = Path(name).suffix
            if name.startswith(".") or suffix in readable or _LANGUAGE_SUFFIX.fullmatch(suffix):
                continue
            if _NAMES_A_SPLIT.search((here / name).as_posix()):
                found.append(Path(root) / name)
    return found


# --------------------------------------------------------------------------
# One reader per data set
# --------------------------------------------------------------------------

# Label values -> Table 7 answer words. `datasets` exports store class ids
# (super_glue rte: 0 entailment, 1 not_entailment; cb: 0 entailment,
# 1 contradiction, 2 neutral; wic: 0 different, 1 same sense; snli: 0 entailment,
# 1 neutral, 2 contradiction), the official releases store names or booleans.
RTE_LABELS = {0: "True", 1: "False", "entailment": "True", "not_entailment": "False"}
CB_LABELS = {
    0: "True",
    1: "False",
    2: "Neither",
    "entailment": "True",
    "contradiction": "False",
    "neutral": "Neither",
}
WIC_LABELS = {0: "False", 1: "True", ("bool", False): "False", ("bool", True): "True"}
SNLI_LABELS = {
    0: "True",
    1: "Neither",
    2: "False",
    "entailment": "True",
    "neutral": "Neither",
    "contradiction": "False",
}


def _label_targets(record, key, mapping, where, split):
    """[answer word], or [] for an unlabeled test example (-1 in `datasets` exports,
    no label field in the SuperGLUE release)."""
    value = record.get(key, _MISSING)
    if value is _MISSING and split != "test":
        raise DamagedFile(f"{where}: missing field {key!r}")
    if value is _MISSING or value == -1:
        return []
    return [label_word(value, mapping, where, key)]


# GLUE's RTE (nyu-mll/glue, config rte) names the two sentences sentence1 and
# sentence2; its labels mean what SuperGLUE's do (0 entailment, 1 not_entailment,
# -1 hidden test label), so RTE_LABELS reads both.
GLUE_RTE_FIELDS = {"premise": "sentence1", "hypothesis": "sentence2"}


def superglue_reader(name: str, text_fields: tuple, mapping: dict, glue_fields: dict | None = None):
    """RTE, CB, WiC: `datasets` export or SuperGLUE's own jsonl (same field names,
    string/boolean labels, val.jsonl for the dev split). With `glue_fields`
    ({our field: GLUE's field}), a record without text_fields[0] but with GLUE's
    name for it is read in GLUE's layout."""

    def convert(record, where, split):
        glue = (
            glue_fields and text_fields[0] not in record and glue_fields[text_fields[0]] in record
        )
        fields = {f: get_text(record, glue_fields[f] if glue else f, where) for f in text_fields}
        return fields, _label_targets(record, "label", mapping, where, split)

    return lambda data_dir, split: read_split(name, data_dir, split, convert)


def snli_reader(data_dir, split):
    """SNLI: `datasets` export (premise/hypothesis/label, -1 = no gold label) or the
    official snli_1.0_*.jsonl (sentence1/sentence2/gold_label, "-" = no gold label).
    Examples without a gold label are dropped, as everyone does."""

    def convert(record, where, split):
        if "gold_label" in record:
            if record["gold_label"] == "-":
                return None
            fields = {
                "premise": get_text(record, "sentence1", where),
                "hypothesis": get_text(record, "sentence2", where),
            }
            return fields, [label_word(record["gold_label"], SNLI_LABELS, where, "gold_label")]
        fields = {
            "premise": get_text(record, "premise", where),
            "hypothesis": get_text(record, "hypothesis", where),
        }
        label = get_field(record, "label", where)
        return None if label == -1 else (fields, [label_word(label, SNLI_LABELS, where)])

    official = {
        "train": ("snli_1.0_train",),
        "validation": ("snli_1.0_dev",),
        "test": ("snli_1.0_test",),
    }
    stems = SPLIT_STEMS.get(split, (split,)) + official.get(split, ())
    return read_split("snli", data_dir, split, convert, stems)


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
            raise DamagedFile(f"{where}: expected choices labelled A, B, C, D, got {labels}")
        answer = get_field(record, "answerKey", where)
        fields = {"question": stem, **{f"option_{k.lower()}": v for k, v in options.items()}}
        return fields, [label_word(answer, {k: k for k in "ABCD"}, where, "answerKey")]

    return read_split("openbookqa", data_dir, split, convert)


def _dedup(texts) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t))


# The release's qa/ files of each split, globbed and sorted as `datasets`' trivia_qa
# script does: validation is verified-web-dev, verified-wikipedia-dev, web-dev,
# wikipedia-dev (407 + 318 + 9,951 + 7,993 = 18,669 questions, Table 8).
TRIVIA_QA_OFFICIAL = {
    "train": "*-train.json",
    "validation": "*-dev.json",
    "test": "*test-without-answers.json",
}


def trivia_qa_reader(data_dir, split):
    """TriviaQA rc.nocontext: `datasets` export (question, answer.value,
    answer.aliases; hidden test answers are [] / "<unk>") or the official release's
    qa/*-<split>.json ({"Data": [{"Question", "Answer": {"Value", "Aliases"}}]}),
    every file of the split concatenated as `datasets` does for rc (TRIVIA_QA_OFFICIAL).
    Targets: the answer value, then every alias (all count for exact match)."""
    folder = task_folder(data_dir, "trivia_qa")
    pattern = TRIVIA_QA_OFFICIAL.get(split)
    for official_dir in (folder / "qa", folder):
        files = sorted(official_dir.glob(pattern)) if pattern else []
        if files:
            return _trivia_qa_official(files, split)

    def convert(record, where, split):
        value = get_field(record, "answer.value", where)
        aliases = get_field(record, "answer.aliases", where)
        targets = _dedup([value] + list(aliases)) if value not in ("", "<unk>") else _dedup(aliases)
        return {"question": get_text(record, "question", where)}, targets

    return read_split(
        "trivia_qa", data_dir, split, convert, also=[f"qa/{pattern}"] if pattern else []
    )


def _trivia_qa_official(files, split):
    examples = []
    for path in files:
        records = get_field(read_json(path), "Data", f"{path}:1")
        for i, record in enumerate(records):
            where = f"{path}: Data[{i}]"
            answer = record.get("Answer")  # absent in the *-test-without-answers files
            if answer is None and split != "test":
                raise DamagedFile(f"{where}: missing field 'Answer'")
            # `datasets` strips the question, the value and each alias; so do we.
            targets = (
                []
                if answer is None
                else _dedup(
                    [get_text(answer, "Value", where).strip()]
                    + [a.strip() for a in get_field(answer, "Aliases", where)]
                )
            )
            examples.append(({"question": get_text(record, "Question", where).strip()}, targets))
    if not examples:
        raise DamagedFile(f"{files[0].parent}: no examples in split {split!r}")
    return examples


_WEBQ_DESCRIPTION = re.compile(r'\(description (?:"((?:[^"\\]|\\.)*)"|([^()"]*))\)')


def parse_webquestions_target(target_value: str, where: str) -> list[str]:
    """The answers of a targetValue:
    '(list (description "Jazmine Sullivan") (description Ohio))' -> ['Jazmine Sullivan', 'Ohio']."""
    answers = [
        quoted.replace('\\"', '"') if quoted else bare.strip()
        for quoted, bare in _WEBQ_DESCRIPTION.findall(target_value)
    ]
    if not target_value.startswith("(list") or not answers:
        raise DamagedFile(
            f"{where}: targetValue {target_value[:60]!r} is not '(list (description ...) ...)'"
        )
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
            raise DamagedFile(f"{official}: expected a non-empty JSON array of questions")
        return [
            (
                {"question": get_text(r, "utterance", f"{official}: [{i}]")},
                parse_webquestions_target(
                    get_text(r, "targetValue", f"{official}: [{i}]"), f"{official}: [{i}]"
                ),
            )
            for i, r in enumerate(records)
        ]

    def convert(record, where, split):
        answers = get_field(record, "answers", where)
        if not isinstance(answers, list):
            raise DamagedFile(f"{where}: field 'answers' should be a list of strings")
        return {"question": get_text(record, "question", where)}, _dedup(answers)

    return read_split("web_questions", data_dir, split, convert, also=[official.name])


# The official files of each WMT task's validation and test splits (newstest2014.en, ...).
WMT_NEWSTEST = {
    "wmt14_enfr": {"validation": ("newstest2013",), "test": ("newstest2014",)},
    "wmt16_ende": {"validation": ("newstest2015",), "test": ("newstest2016",)},
    "wmt16_enro": {"validation": ("newsdev2016",), "test": ("newstest2016",)},
}


def translation_reader(name: str, source: str, target: str, official_stems: dict):
    """WMT: `datasets` export ({"translation": {"en": ..., "fr": ...}}) or two
    aligned plain-text files <stem>.<source> and <stem>.<target> (one sentence per
    line, e.g. newstest2014.en / newstest2014.fr as sacrebleu -- echo src/ref -- writes them)."""

    def convert(record, where, split):
        return (
            {"sentence": get_text(record, f"translation.{source}", where)},
            [get_text(record, f"translation.{target}", where)],
        )

    def load(data_dir, split):
        folder = task_folder(data_dir, name)
        stems = SPLIT_STEMS.get(split, (split,)) + official_stems.get(split, ())
        if not split_files(folder, split, stems):  # no export: two aligned plain-text files?
            for stem in stems:
                src, tgt = folder / f"{stem}.{source}", folder / f"{stem}.{target}"
                if src.is_file() and tgt.is_file():
                    return _read_parallel(src, tgt, split)
        return read_split(
            name,
            data_dir,
            split,
            convert,
            stems,
            also=[f"{s}.{source} + {s}.{target}" for s in stems],
        )

    return load


def _all_lines(path):
    with open(path, "rb") as f:
        return [decode_line(path, lineno, raw) for lineno, raw in enumerate(f, 1)]


def _read_parallel(src: Path, tgt: Path, split: str) -> LazySequence:
    """Line i of each file is pair i, read on demand (`indexed_lines`); small files are read
    whole."""
    if src.stat().st_size + tgt.stat().st_size < STREAM_MIN_BYTES:
        sources, targets = _all_lines(src), _all_lines(tgt)
        if len(sources) != len(targets):
            raise DamagedFile(
                f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; "
                "the two files must be aligned line by line"
            )
        if not sources:
            raise DamagedFile(f"{src}: no examples in split {split!r}")
        return [({"sentence": s}, [t]) for s, t in zip(sources, targets)]

    def utf8(path):  # every line is kept; building the index checks that it is UTF-8
        return lambda lineno, raw: decode_line(path, lineno, raw) is not None

    key = f"lines {code_fingerprint(decode_line)}"
    sources, targets = (indexed_lines(path, key, utf8(path)) for path in (src, tgt))
    if len(sources) != len(targets):
        raise DamagedFile(
            f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; "
            "the two files must be aligned line by line"
        )
    if not sources:
        raise DamagedFile(f"{src}: no examples in split {split!r}")
    return LazySequence(
        len(sources),
        lambda i: ({"sentence": decode_line(src, *sources[i])}, [decode_line(tgt, *targets[i])]),
    )


def xsum_reader(data_dir, split):
    """XSum: `datasets` export (document, summary, id)."""

    def convert(record, where, split):
        return {"article": get_text(record, "document", where)}, [
            get_text(record, "summary", where)
        ]

    return read_split("xsum", data_dir, split, convert)


def wiki_lingua_reader(data_dir, split):
    """WikiLingua English, GEM version (GEM/wiki_lingua, config en):
    source, target and, where present, references (all used for scoring)."""

    def convert(record, where, split):
        references = record.get("references") or []
        return (
            {"article": get_text(record, "source", where)},
            _dedup([get_text(record, "target", where)] + list(references)),
        )

    return read_split("wiki_lingua_en", data_dir, split, convert)


# --------------------------------------------------------------------------
# The generic task: any data set written as JSON Lines, CSV or TSV, and its task.json
# --------------------------------------------------------------------------

GENERIC_SOURCE = "generic task folder (JSON Lines, CSV or TSV, and a task.json)"


def template_fields(template: str) -> list[str]:
    """The `{field}` names of a format string, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def jsonl_task_reader(name: str, label_words=None, fields=None, template="{input}"):
    """Generic task: one example per JSON Lines line ({"input": ..., "target": ... |
    "targets": [...]}) or per CSV/TSV row (columns input,target). Every string field or column
    is available to the template; `fields` (task.json's "fields") maps a template field, or
    "target", to the field or column that holds it, e.g. {"input": "text", "target": "label"}.
    Each field the template names must be in every example; a test example may have no target
    (an empty cell in a table). With `label_words` every target must be one of them."""
    columns = {"target": "target", **(fields or {})}  # template field or "target" -> column

    def convert(record, where, split):
        targets = generic_targets(record, columns["target"], where, split)
        answers = (columns["target"], "targets")
        values = {k: v for k, v in record.items() if isinstance(v, str) and k not in answers}
        for field_name in template_fields(template):
            values[field_name] = template_value(record, field_name, columns, where)
        wrong = [t for t in targets if label_words and t not in label_words]
        if wrong:
            raise DamagedFile(
                f"{where}: target {json.dumps(wrong[0])} is not one of the task's label_words "
                f"({', '.join(map(json.dumps, label_words))}; see its task.json)"
            )
        return values, targets

    return lambda data_dir, split: read_split(name, data_dir, split, convert, tables=True)


def generic_targets(record, column, where, split) -> list[str]:
    """The references of a generic example: its `column` ("target" unless task.json's fields
    say), or a JSON list "targets"; [] for a test example without one (no field, or in a table
    an empty cell)."""
    table = isinstance(record, TableRow)
    if column == "target" and "targets" in record and not table:
        targets = record["targets"]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise DamagedFile(f"{where}: field 'targets' should be a list of strings")
        return list(targets)
    if column in record and not (table and record[column] == ""):
        return [get_text(record, column, where)]
    if split == "test":
        return []
    if column == "target" and not table:
        raise DamagedFile(f"{where}: missing field 'target' (or 'targets')")
    kind = "an empty column" if column in record else "no column" if table else "no field"
    mapped = "as task.json's fields say" if column != "target" else "task.json's fields may map it"
    raise DamagedFile(
        f"{where}: {kind} {column!r} for the target ({mapped}); "
        f"the example has {', '.join(map(repr, record)) or 'none'}"
    )


def template_value(record, field_name, columns, where) -> str:
    """The text of one template field: the record's own field, or the column task.json maps it
    to; a DamagedFile names the file, line and column when the example has none."""
    column = columns.get(field_name, field_name)
    if column not in record:
        kind = "column" if isinstance(record, TableRow) else "field"
        mapped = f" (task.json's fields map {{{field_name}}} to it)" if column != field_name else ""
        raise DamagedFile(
            f"{where}: no {kind} {column!r} for the template's {{{field_name}}}{mapped}; "
            f"the example has {', '.join(map(repr, record)) or 'none'}"
        )
    return get_text(record, column, where)


def read_task_json(path, data_dir, accepted_keys, metrics) -> dict:
    """The settings of a generic task from its `task.json` (read only if its folder has no link
    out of `data_dir`, `check_links_inside`): a JSON object whose keys are among
    `accepted_keys`, whose "metric", if given, is one of `metrics`, whose "label_words" are
    words, and whose template, split names and input bound pass `check_task_json`."""
    check_links_inside(Path(path).parent, data_dir, "--data-dir")
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise BadInput(f"{path}: expected a JSON object with keys {', '.join(accepted_keys)}")
    unknown = sorted(set(spec) - set(accepted_keys))
    if unknown:
        raise BadInput(
            f"{path}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted_keys)}"
        )
    if spec.get("metric", "exact_match") not in metrics:
        raise BadInput(f"{path}: metric {spec['metric']!r} is not one of {', '.join(metrics)}")
    words = spec.get("label_words")
    if words is not None and not (
        isinstance(words, list) and words and all(isinstance(w, str) and w for w in words)
    ):
        raise BadInput(
            f"{path}: label_words is {json.dumps(words)}; expected a list of answer words, "
            'e.g. ["True", "False"]'
        )
    check_task_json(path, spec)
    return spec


def check_task_json(path, spec):
    """A task.json's template, split names and input bound: a template of plain named fields,
    without a format spec or conversion ({input:>9999999999} would pad an input to any width,
    {input!r} quote it); split names that are plain names like task names (a split is a file
    of the task folder, never '../x'); a positive max_input_tokens."""
    template = spec.get("template", "{input}")
    try:  # named fields only: {0} or {} would take an example's fields by position
        fields = [f for f in string.Formatter().parse(template) if f[1] is not None]
    except (TypeError, ValueError, AttributeError) as e:
        raise BadInput(f"{path}: template {template!r} is not a format string ({e})") from None
    if not fields or not all(name.isidentifier() for _, name, _, _ in fields):
        raise BadInput(f"{path}: template {template!r} needs named fields such as {{input}}")
    for _, name, format_spec, conversion in fields:
        if format_spec or conversion:
            raise BadInput(
                f"{path}: template {template!r}: field {name!r} has a format spec or conversion;"
                " expected plain fields such as {input}"
            )
    for key in ("eval_split", "demo_split"):
        check_split_name(spec.get(key, "train"), f"{path}: {key}")
    check_fields_map(path, spec.get("fields", {}), [name for _, name, _, _ in fields])
    limit = spec.get("max_input_tokens")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise BadInput(f"{path}: max_input_tokens is {json.dumps(limit)}; expected an integer >= 1")


def check_fields_map(path, mapping, names):
    """task.json's "fields": {template field or "target": field or column name}, each key one of
    the template's `names` or "target" (a key it does not name is a typo that would do nothing)."""
    example = '{"input": "text", "target": "label"}'
    if not isinstance(mapping, dict) or not all(
        isinstance(v, str) and v.strip() for v in mapping.values()
    ):
        raise BadInput(
            f"{path}: fields is {json.dumps(mapping)[:80]}; expected an object mapping template "
            f"fields to column names, e.g. {example}"
        )
    for key in mapping:
        if key not in names and key != "target":
            raise BadInput(
                f"{path}: fields maps {key!r}, which the template does not name; expected "
                f"one of {', '.join(map(repr, dict.fromkeys(names)))} or 'target'"
            )


def paper_readers() -> dict:
    """Each of the paper's twelve tasks (data.PAPER_TASKS) -> the reader of its data set's
    published layouts, above."""
    nli = ("premise", "hypothesis")
    wmt = {
        name: translation_reader(name, "en", name[-2:], WMT_NEWSTEST[name])
        for name in ("wmt14_enfr", "wmt16_ende", "wmt16_enro")
    }
    return {
        "rte": superglue_reader("rte", nli, RTE_LABELS, GLUE_RTE_FIELDS),
        "cb": superglue_reader("cb", nli, CB_LABELS),
        "wic": superglue_reader("wic", ("word", "sentence1", "sentence2"), WIC_LABELS),
        "snli": snli_reader,
        "openbookqa": openbookqa_reader,
        "trivia_qa": trivia_qa_reader,
        "web_questions": web_questions_reader,
        **wmt,
        "xsum": xsum_reader,
        "wiki_lingua_en": wiki_lingua_reader,
    }
