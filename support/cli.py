"""Command-line plumbing shared by promot.py, evaluate.py and diagnostics.py.

A leaf of promot (standard library and support/errors.py): a dataclass of settings
as flags with their accepted ranges, a parser whose errors are one line, and a
one-line progress meter.
"""

import argparse
import dataclasses
import math
import sys
import time

from support.errors import BadInput


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
    (lambda v: v >= 1, ">= 1"),
    (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
)
RATE = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def add_flags(parser, settings_class, required=()):
    """One --flag-name per field of the dataclass `settings_class`. A boolean that is off by
    default is switched on by --flag-name; one that is on by default is switched off by
    --no-flag-name. A field whose type is `list` takes comma-separated numbers ("0,1,4")."""
    for f in dataclasses.fields(settings_class):
        if "help" not in f.metadata:
            continue  # a field that is not a flag
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type in (bool, "bool"):
            on = not f.default
            parser.add_argument(
                name if on else "--no-" + name[2:],
                dest=f.name,
                action="store_true" if on else "store_false",
                help=help_,
            )
            continue
        kind = {"list": numbers_flag(name), list: numbers_flag(name)}.get(f.type, f.type)
        kind = {"int": int, "float": float, "str": str}.get(kind, kind)
        parser.add_argument(
            name,
            type=kind,
            required=f.name in required,
            default=None if f.name in required else f.default,
            choices=f.metadata.get("choices"),
            help=help_,
        )


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
    """Tokens/s over the steps since the last report, and the ETA from the time spent in
    steps so far (checkpoints and scoring excluded), for a loop from `start` to `steps`."""

    def __init__(self, start, steps):
        self.start, self.steps, self.began = start, steps, time.time()
        self.window_tokens, self.window_time, self.step_time = 0, 0.0, 0.0

    def step(self, tokens, seconds):
        """One step of `tokens` tokens that took `seconds`."""
        self.window_tokens, self.window_time = (
            self.window_tokens + tokens,
            self.window_time + seconds,
        )
        self.step_time += seconds

    def report(self, step):
        """(tokens/s since the last report, ETA in seconds, seconds since the start)."""
        tps = self.window_tokens / max(self.window_time, 1e-9)
        eta = self.step_time / (step - self.start) * (self.steps - step)
        self.window_tokens, self.window_time = 0, 0.0
        return tps, eta, time.time() - self.began


def progress_printer(label, stream=None):
    """A `progress(done, total)` callback printing one updating line with examples/s and ETA
    (to `stream`, default stderr)."""
    start = time.time()

    def progress(done, total):
        elapsed = max(time.time() - start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        end = "\n" if done >= total else ""
        print(
            f"\r{label}: {done}/{total} examples, {rate:.1f} examples/s, ETA {eta:.0f}s ",
            end=end,
            file=stream or sys.stderr,
            flush=True,
        )

    return progress
