"""The bench scripts run: bench/gpu.sh steps aside cleanly without a GPU, bench/train.py and
bench/generate.py finish at the tiny shape, bench/causal_train.py and bench/causal_generate.py
with --quick (their numbers are for the docs, not here)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv, **env):
    return subprocess.run(
        list(argv),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def test_gpu_script_without_a_gpu_says_so_and_exits_0():
    result = run("bash", "bench/gpu.sh", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        == "bench/gpu.sh: no CUDA device visible; GPU checks skipped, nothing measured"
    )


def test_train_bench_compares_both_stages_and_adafactor_at_the_tiny_shape():
    result = run(
        sys.executable,
        "bench/train.py",
        "--shape",
        "tiny",
        "--threads",
        "1",
        "--steps",
        "1",
        "--batch",
        "2",
        "--src",
        "8",
        "--tgt",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert (
        last.startswith("speed ratios")
        and "stage 1" in last
        and "stage 2" in last
        and "Adafactor" in last
    )
    assert "of GEMM peak" in result.stdout and "GFLOP/step" in result.stdout


def test_generate_bench_checks_both_sides_return_the_same_tokens():
    result = run(
        sys.executable,
        "bench/generate.py",
        "--shape",
        "tiny",
        "--threads",
        "1",
        "--iters",
        "1",
        "--batch",
        "4",
        "--src",
        "16",
        "--new",
        "8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("same tokens: True") == 2  # the padded and the mixed batch
    assert result.stdout.strip().splitlines()[-1].startswith("beam search speed ratios")


def test_causal_train_bench_checks_the_losses_agree_and_times_both_stages():
    result = run(sys.executable, "bench/causal_train.py", "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same loss:" in result.stdout  # the run stops before timing when they differ
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("speed ratios") and "stage 1" in last and "stage 2" in last
    assert result.stdout.count("of GEMM peak") == 4 and result.stdout.count("peak memory") == 4


def test_causal_generate_bench_checks_both_sides_return_the_same_tokens():
    result = run(sys.executable, "bench/causal_generate.py", "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    # greedy and beam 4, each with answers to the limit and with answers of mixed lengths
    assert result.stdout.count("same tokens: True") == 4
    assert result.stdout.count("floor: prefill") == 1
    last = result.stdout.strip().splitlines()[-1]
    for search in (
        "greedy, to the limit",
        "beam 4, to the limit",
        "greedy, mixed",
        "beam 4, mixed",
    ):
        assert search in last
