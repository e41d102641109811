"""Command-line plumbing shared by promot.py, evaluate.py and diagnostics.py.

A leaf of promot (standard library only): renamed flags that keep working with
a note, and a one-line progress meter.
"""

import sys
import time


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
