"""Command-line plumbing shared by promot.py, evaluate.py and diagnostics.py.

A leaf of promot (standard library only): a dataclass of settings as flags with
their accepted ranges, renamed flags that keep working with a note, and a
one-line progress meter.
"""

import argparse
import dataclasses
import math
import sys
import time


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except None: the flag's help says what None means."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def flag(default, help, **kw):
    """A settings-dataclass field that is a flag: its default, its --help text, and optionally
    `choices` or `valid=(test, "what it accepts")`."""
    return dataclasses.field(default=default, metadata=dict(help=help, **kw))


# What a numeric flag accepts (`valid=`); None, where a flag allows it, means a default or off.
AT_LEAST_1, AT_LEAST_0 = (lambda v: v >= 1, ">= 1"), (lambda v: 0 <= v < math.inf, "a finite number >= 0")
RATE = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def add_flags(parser, settings_class, required=()):
    """One --flag-name per field of the dataclass `settings_class` (booleans get --no-flag-name)."""
    for f in dataclasses.fields(settings_class):
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            parser.add_argument(name, type=f.type, required=f.name in required, default=None if f.name in
                                required else f.default, choices=f.metadata.get("choices"), help=help_)


def numbers(text, flag, error=ValueError):
    """The integers >= 0 of a comma-separated flag value ("1,4"); else `error(one line)`."""
    if not all(part.strip().isdigit() for part in text.split(",")):
        raise error(f"{flag} {text!r}: expected comma-separated numbers like 1,4")
    return [int(part) for part in text.split(",")]


def out_of_range(settings):
    """"--flag value: expected ..." for the first field outside its `valid` range, else None."""
    for f in dataclasses.fields(settings):
        value, (ok, expected) = getattr(settings, f.name), f.metadata.get("valid", (None, None))
        if ok is not None and value is not None and not (value == value and ok(value)):
            return f"--{f.name.replace('_', '-')} {value}: expected {expected}"
    return None


def renamed_flags(argv, renamed, prog):
    """argv with renamed flags replaced by their new names, each with a one-line note on stderr."""
    out = []
    for arg in argv:
        old, eq, value = arg.partition("=")
        if old in renamed:
            print(f"{prog}: {old} is now {renamed[old]}; the old name will go away", file=sys.stderr)
            arg = renamed[old] + eq + value
        out.append(arg)
    return out


def progress_printer(label, stream=None):
    """A `progress(done, total)` callback printing one updating line with examples/s and ETA
    (to `stream`, default stderr)."""
    start = time.time()

    def progress(done, total):
        elapsed = max(time.time() - start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done}/{total} examples, {rate:.1f} examples/s, ETA {eta:.0f}s ",
              end=end, file=stream or sys.stderr, flush=True)
    return progress
