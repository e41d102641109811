"""Progress a reader sees: evaluate.py's line per batch (support/cli.progress_printer), the
training line's tokens/s and ETA (support/cli.StepMeter), lab/run.py's numbered commands."""

import io
import sys

from support import cli


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_a_terminal_is_one_plain_line_per_update():
    log = io.StringIO()  # a log file or a pipe: not a terminal
    progress = cli.progress_printer("cb 1-shot", stream=log, every=0)
    for done in (4, 8, 10):
        progress(done, 10)
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == "" and len(lines) == 4
    assert [line.split(",")[0] for line in lines[:3]] == [
        "cb 1-shot: 4/10 examples",
        "cb 1-shot: 8/10 examples",
        "cb 1-shot: 10/10 examples",
    ]


def test_progress_off_a_terminal_prints_at_most_one_line_per_interval_and_always_the_last():
    log = io.StringIO()
    progress = cli.progress_printer("xsum 0-shot", stream=log, every=3600)
    for done in range(1, 101):
        progress(done, 100)
    assert log.getvalue().count("\n") == 1 and "100/100 examples" in log.getvalue()


def test_progress_on_a_terminal_redraws_one_line():
    screen = Terminal()
    progress = cli.progress_printer("cb 1-shot", stream=screen)
    for done in (4, 8, 10):
        progress(done, 10)
    assert screen.getvalue().count("\r") == 3 and screen.getvalue().count("\n") == 1


def test_step_meter_throughput_and_eta_barely_move_for_one_slow_step():
    meter = cli.StepMeter(start=0, steps=200)
    for _ in range(60):
        meter.step(1000, 0.1)  # 10,000 tokens/s
    steady, eta, _ = meter.report(60)
    assert round(steady) == 10_000 and round(eta) == 14  # 140 steps left at 0.1 s
    meter.step(1000, 1.0)  # one step ten times slower (a probe, a busy machine)
    tps, eta, _ = meter.report(61)
    assert 0.8 * steady < tps < steady and 13.9 < eta < 14 * 1.2
    for _ in range(50):  # the window forgets it
        meter.step(1000, 0.1)
    assert round(meter.report(111)[0]) == 10_000


def test_lab_run_numbers_its_commands(tmp_path):
    from lab import run as lab_run

    screen = io.StringIO()
    run = lab_run.Commands(3, quiet=False, stream=screen)
    for word in ("a", "b", "c"):
        run([sys.executable, "-c", f"print('{word}')"], tmp_path / f"{word}.log")
    lines = screen.getvalue().splitlines()
    assert [line[:8] for line in lines[::2]] == ["[1/3] $ ", "[2/3] $ ", "[3/3] $ "]
    assert lines[1::2] == ["    a", "    b", "    c"]
    assert (tmp_path / "b.log").read_text() == "b\n"
