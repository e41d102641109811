"""Is the lab table published in docs/lab.md what `python lab/run.py` prints, cell for cell?

A check to run by hand after a change that may move the lab's numbers (not a CI test: a full run
takes minutes).

    python bench/lab_table.py                      # runs `python lab/run.py`, then compares
    python bench/lab_table.py --seed 1             # the same for the seed-1 table
    python bench/lab_table.py --table RUN/table.md # compares a run that already exists

The published table is the one in --docs whose header row is lab/run.py's and whose paragraph
just above says "seed N". Every cell is compared as text (lab/run.py prints one decimal); each
difference is printed, and the exit status is 1 when there is one, 0 when the tables are equal.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cells(line):
    """The cells of one markdown table row, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text):
    """[(paragraph above, [row lines])] for every markdown table in `text`."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        above = i
        while above > 0 and not lines[above - 1].strip():  # the blank lines before the table
            above -= 1
        last = above
        while above > 0 and lines[above - 1].strip():
            above -= 1
        end = i
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        found.append(("\n".join(lines[above:last]), lines[i:end]))
        i = end
    return found


def published(docs, header, seed):
    """The rows of the table in `docs` with this header row, after a paragraph naming the seed."""
    said = re.compile(rf"\bseed {seed}\b", re.IGNORECASE)
    for paragraph, rows in tables(docs.read_text(encoding="utf-8")):
        if cells(rows[0]) == cells(header) and said.search(paragraph):
            return rows
    raise SystemExit(
        f"{docs}: no table with lab/run.py's header ({header.strip()}) after a paragraph "
        f"that says 'seed {seed}'"
    )


def differences(theirs, ours):
    """One line per cell that differs between two tables of the same layout (row lines)."""
    columns = cells(ours[0])
    if cells(theirs[0]) != columns:
        return [f"header: published {theirs[0].strip()}, this run {ours[0].strip()}"]
    rows = {cells(r)[0]: cells(r)[1:] for r in theirs[2:]}
    found = []
    for line in ours[2:]:
        label, values = cells(line)[0], cells(line)[1:]
        if label not in rows:
            found.append(f"{label}: not in the published table")
            continue
        for column, mine, theirs_ in zip(columns[1:], values, rows.pop(label)):
            if mine != theirs_:
                found.append(f"{label} | {column}: published {theirs_}, this run {mine}")
    found += [f"{label}: published, but not in this run's table" for label in rows]
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="lab/run.py's --seed, and the table's")
    p.add_argument("--table", help="table.md of an existing lab/run.py run, instead of a new run")
    p.add_argument("--docs", default=str(ROOT / "docs" / "lab.md"), help="the published table")
    args = p.parse_args(argv)
    table = Path(args.table) if args.table else None
    if table is None:
        out = Path(tempfile.mkdtemp(prefix="lab_table_")) / "run"
        command = [sys.executable, "lab/run.py", "--seed", str(args.seed), "--out", str(out)]
        print("$ " + " ".join(command), flush=True)
        subprocess.run([*command, "--quiet"], cwd=ROOT, check=True)
        table = out / "table.md"
    ours = [line for line in table.read_text(encoding="utf-8").splitlines() if line.strip()]
    theirs = published(Path(args.docs), ours[0], args.seed)
    found = differences(theirs, ours)
    for line in found:
        print(line)
    count = sum(len(cells(r)) - 1 for r in ours[2:])
    if found:
        print(f"{len(found)} of {count} cells differ from {args.docs} (seed {args.seed})")
        return 1
    print(f"{args.docs}: the seed-{args.seed} table equals this run's, cell for cell ({count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
