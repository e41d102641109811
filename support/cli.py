"""Command-line plumbing shared by promot.py, evaluate.py and diagnostics.py.

A leaf of promot (standard library and support/errors.py): a dataclass of settings
as flags with their accepted ranges, a parser whose errors are one line, and a
one-line progress meter.
"""

import argparse
import collections
import dataclasses
import json
import math
import sys
import time

from support.errors import BadInput, DamagedFile


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except None, "" and switches: there the help says it."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default == "" or isinstance(default, bool) or action.dest == "help":
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a BadInput naming the flag ("--shots x: expected ..."),
    so the command prints them as one line, like every other input error."""

    def error(self, message):
        stray = message.removeprefix("unrecognized arguments:")
        if stray != message and not stray.strip().startswith("-"):  # `--data-dir a b`
            message += " (a flag takes one value: several folders or tasks go comma-separated, "
            message += "--data-dir a,b)"
        raise BadInput(
            message.removeprefix("argument ").replace(": ", " ", 1)
            if message.startswith("argument --")
            else message
        )


def flag(default, help, **kw):
    """A settings-dataclass field that is a flag: its default, its --help text, and optionally
    `choices` or `valid=(test, "what it accepts")`."""
    return dataclasses.field(default=default, metadata=dict(help=help, **kw))


# What a numeric flag accepts (`valid=`); None, where a flag allows it, means a default or off.
AT_LEAST_1, AT_LEAST_0 = (
    (lambda v: 1 <= v < 2**63, ">= 1 (and < 2**63)"),
    (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
)
RATE = (lambda v: 0 <= v < 1, "a number in [0, 1)")
FINITE = (math.isfinite, "a finite number")
POSITIVE_NUMBER = (lambda v: 0 < v < math.inf, "a finite number > 0")


def add_flags(parser, settings_class, required=(), title=None):
    """One --flag-name per field of the dataclass `settings_class`. A boolean that is off by
    default is switched on by --flag-name; one that is on by default is switched off by
    --no-flag-name. A field whose type is `list` takes comma-separated numbers ("0,1,4").
    --help lists them under `title`, and a field with `group=` under that heading."""
    groups = {None: parser.add_argument_group(title) if title else parser}
    for f in dataclasses.fields(settings_class):
        if "help" not in f.metadata:
            continue  # a field that is not a flag
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        heading = f.metadata.get("group")
        if heading not in groups:
            groups[heading] = parser.add_argument_group(heading)
        group = groups[heading]
        if f.type in (bool, "bool"):
            on = not f.default
            group.add_argument(
                name if on else "--no-" + name[2:],
                dest=f.name,
                action="store_true" if on else "store_false",
                help=help_,
            )
            continue
        kind = {"list": numbers_flag(name), list: numbers_flag(name)}.get(f.type, f.type)
        kind = {"int": int, "float": float, "str": str}.get(kind, kind)
        group.add_argument(
            name,
            type=kind,
            required=f.name in required,
            default=None if f.name in required else f.default,
            choices=f.metadata.get("choices"),
            help=help_,
        )


def count(n, noun):
    """ "1 demonstration", "2 demonstrations": a number and its noun, in agreement."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def given_flags(parser, argv=None):
    """The dests of the flags present on the command line `argv` (abbreviations included):
    argparse fills in a default only where the namespace it is given holds no value yet."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_args(argv, namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}


def read_recipe(path, sections):
    """The recipe file `path`: JSON {section: {setting: value}}, its sections among `sections`
    (an "about" text aside). DamagedFile, naming the file, for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        raise DamagedFile(f"{path}: expected a JSON object of {{flag: value}} sections ({err})")
    if not isinstance(table, dict):
        raise DamagedFile(f"{path}: expected a JSON object of {{flag: value}} sections")
    table = {k: v for k, v in table.items() if k != "about"}
    for name, values in table.items():
        if name not in sections or not isinstance(values, dict):
            raise DamagedFile(
                f"{path}: {name!r}: expected a section of {{flag: value}} named one of "
                f"{', '.join(repr(s) for s in sections)}"
            )
    return table


def recipe(path, sections, settings, given=(), known=None):
    """The values that the recipe file `path` (read_recipe: its sections among `known`) gives in
    `sections` (later sections win) for the settings `settings` ({name: dataclass field}), those
    in `given` left out; each checked as its flag would be (type, choices, range)."""
    table = read_recipe(path, known or sections)
    values = {}
    for section in sections:
        for name, value in table.get(section, {}).items():
            if name not in settings:
                raise DamagedFile(f"{path}: {section!r}: {name!r} is no setting of the command")
            values[name] = recipe_value(settings[name], value, f"{path}: {section!r}: {name}")
    return {k: v for k, v in values.items() if k not in given}


def recipe_value(f, value, where):
    """`value` as the dataclass field `f` takes it (a list of numbers from "1,4" too), else a
    BadInput "`where` value: expected ..."."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(f.type, f.type)
    if kind is list and isinstance(value, (str, int)) and not isinstance(value, bool):
        value = numbers(str(value), where, BadInput)  # "1,4", or one number
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = {
        int: isinstance(value, int) and numeric,
        float: numeric,
        list: isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value),
    }.get(kind, isinstance(value, kind))
    if value is None and f.default is None:
        return None
    if not fits:
        raise BadInput(f"{where} {value!r}: expected {getattr(kind, '__name__', kind)}")
    if f.metadata.get("choices") and value not in f.metadata["choices"]:
        raise BadInput(f"{where} {value!r}: expected one of {', '.join(f.metadata['choices'])}")
    ok, expected = f.metadata.get("valid", (None, None))
    if ok is not None and not (value == value and ok(value)):
        raise BadInput(f"{where} {value!r}: expected {expected}")
    return float(value) if kind is float else value


def mark_recipe(parser, path, table):
    """--help names the recipe in force (`path`, read into `table`, or "" for none) and, on each
    flag it sets, its values: "(the recipe's: 32; without it: 64)", "(... 200 (prompt))"."""
    parser.description += f" Recipe in force for this command line: {path or 'none'}."
    for action in parser._actions:
        values = {name: v[action.dest] for name, v in table.items() if action.dest in v}
        if not values or action.help is None:
            continue
        said = ", ".join(
            str(v) if name == "every stage" else f"{v} ({name})" for name, v in values.items()
        )
        paper = "" if action.default in (None, "", False) else "; without it: %(default)s"
        action.help = f"{action.help} (the recipe's: {said}{paper})"


def numbers_flag(flag):
    """An argparse `type` for comma-separated numbers, with a one-line error naming the flag."""

    def parse(text):
        try:
            return numbers(text, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag} ")) from None

    parse.__name__ = "comma-separated numbers"
    return parse


def numbers(text, flag, error=ValueError):
    """The integers >= 0 of a comma-separated flag value ("1,4"); else `error(one line)`."""
    if not all(part.strip().isdigit() for part in text.split(",")):
        raise error(f"{flag} {text}: expected comma-separated numbers like 1,4")
    return [int(part) for part in text.split(",")]


def out_of_range(settings):
    """ "--flag value: expected ..." for the first field outside its `valid` range, else None."""
    for f in dataclasses.fields(settings):
        value, (ok, expected) = getattr(settings, f.name), f.metadata.get("valid", (None, None))
        if ok is not None and value is not None and not (value == value and ok(value)):
            return f"--{f.name.replace('_', '-')} {value}: expected {expected}"
    return None


class StepMeter:
    """Tokens/s and the ETA of a loop from `start` to `steps`, both from the last `window` steps
    (time spent in steps only: checkpoints, scoring and diagnostics excluded), so one slow or
    fast step moves neither much."""

    def __init__(self, start, steps, window=50):
        self.start, self.steps, self.began = start, steps, time.time()
        self.recent = collections.deque(maxlen=window)  # (tokens, seconds) of the last steps

    def step(self, tokens, seconds):
        """One step of `tokens` tokens that took `seconds`."""
        self.recent.append((tokens, seconds))

    def report(self, step):
        """(tokens/s, ETA in seconds, seconds since the start)."""
        tokens, seconds = (sum(column) for column in zip(*self.recent)) if self.recent else (0, 0)
        eta = seconds / max(len(self.recent), 1) * (self.steps - step)
        return tokens / max(seconds, 1e-9), eta, time.time() - self.began


def progress_printer(label, stream=None, every=10.0):
    """A `progress(done, total)` callback printing examples/s and the ETA to `stream` (default
    stderr): on a terminal one line redrawn in place (\\r); elsewhere (a log file, a pipe) one
    plain line per update, at most one each `every` seconds besides the last."""
    stream = stream or sys.stderr
    start = last = time.time()
    redraw = stream.isatty()

    def progress(done, total):
        nonlocal last
        now = time.time()
        if not (redraw or done >= total or now - last >= every):
            return
        last, rate = now, done / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        line = f"{label}: {done}/{total} examples, {rate:.1f} examples/s, ETA {eta:.0f}s"
        end = "\n" if done >= total or not redraw else ""
        print(f"\r{line} " if redraw else line, end=end, file=stream, flush=True)

    return progress
