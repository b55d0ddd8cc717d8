"""benchmarks/gpu_speed_steps.py, the timings gpu_speed.sh takes besides speed.py: run here on the CPU, so that
the script's one GPU run does not find a broken import (as the benchmark's move into a package would have been)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_TRAIN_FLAGS, write_phantom_training_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_speed_steps.py"


def run_script(*args, cwd):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_speed_steps")
    return root, write_phantom_training_data(root, cases=3, seed=8)


def test_the_benchmark_timing_of_this_checkout_records_each_stage(phantom, tmp_path):
    root, priors = phantom
    results = tmp_path / "results.jsonl"
    run_script("benchmark_step", "--name", "immseg_eager", "--checkout", ROOT, "--scratch", tmp_path, "--results",
               "results.jsonl", "--warmup_steps", "1", "--timed_steps", "1", "--", *TINY_TRAIN_FLAGS,
               "--root_path", root / "data", "--prior_embeddings", priors, "--max_epochs", "3",
               "--start_contrast_epoch", "1", "--region_fusion_start_epoch", "2",
               "--log_every", "4", cwd=tmp_path)  # a loss read spans two stages, as --log_every 25 does on a GPU
    [record] = records(results)  # written where it was asked, relative to the caller's folder
    assert record["step"] == "immseg_eager" and record["status"] == "ok"
    assert record["s_per_iteration"] > 0 and len(record["per_stage"]) == 3
    assert record["iterations_per_epoch"] >= 1 and record["peak_cuda_mb"] is None


def test_an_earlier_checkout_is_timed_with_its_own_function(tmp_path):
    """f45b770 kept the timing in benchmarks/myops2020.py, which read its own name at import."""
    old = tmp_path / "old"
    (old / "benchmarks").mkdir(parents=True)
    (old / "benchmarks" / "myops2020.py").write_text(
        "import os, sys\n"
        "assert sys.argv[0] == 'benchmarks/myops2020.py'\n"
        "def time_training_step(flags, warmup, timed):\n"
        "    return 0.5, {'cwd': os.getcwd(), 'flags': flags, 'steps': [warmup, timed]}, 7\n")
    run_script("benchmark_step", "--checkout", old, "--scratch", tmp_path, "--results", tmp_path / "r.jsonl", "--",
               "--batch_size", "8", cwd=tmp_path)
    [record] = records(tmp_path / "r.jsonl")
    assert record["step"] == "benchmark_step" and record["s_per_iteration"] == 0.5
    assert record["per_stage"] == {"cwd": str(old), "steps": [3, 8],
                                   "flags": ["--batch_size", "8", "--output_dir", str(tmp_path / "bench_benchmark_step")]}


def test_the_loader_timing_counts_the_batches_of_an_epoch(phantom, tmp_path):
    root, _ = phantom
    run_script("loader", "--name", "loader_224", "--data", root / "data", "--img_size", "32", "--batch_size", "2",
               "--num_workers", "0", "--results", tmp_path / "r.jsonl", cwd=tmp_path)
    [record] = records(tmp_path / "r.jsonl")
    slices = len((root / "data" / "train.txt").read_text().split())
    assert record["step"] == "loader_224" and record["batches"] == slices // 2 and record["s_per_batch"] > 0
