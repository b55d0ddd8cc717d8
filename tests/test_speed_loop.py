"""benchmarks/speed.py's training loop, profile and loss trace, the parts gpu_speed.sh's one GPU run relies on,
run on the CPU with the testing configuration (the figures themselves are machine-dependent and not checked)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_phantom_training_data

ROOT = Path(__file__).resolve().parents[1]
SPEED = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--vit_name", "testing", "--img_size", "64",
         "--batch_size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_loop")
    write_phantom_training_data(root, cases=3, seed=12)
    return root / "data"


def speed(*args):
    result = subprocess.run([*SPEED, *map(str, args)], capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_loop_is_timed_per_stage_with_its_save_and_profiled(data, tmp_path):
    speed("--loop_data", data, "--loop_warmup_epochs", "1", "--loop_epochs", "1", "--profile", tmp_path / "p.txt",
          "--skip_inference", "--warmup", "0", "--steps", "1", "--json", tmp_path / "s.json")
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["loop_s"] > 0 and figures["loop_iterations_per_epoch"] >= 1
    assert len(figures["loop_stages"]) == 3, "modality heads, + contrast, fused head"
    assert figures["last_write_s"] is not None and figures["profile"]["steps"] == 5
    assert "Name" in (tmp_path / "p.txt").read_text()


def test_the_losses_of_the_first_steps_repeat_from_the_seed(data, tmp_path):
    for name in ("a", "b"):
        speed("--loop_data", data, "--trace_losses", "3", "--deterministic", "1", "--json", tmp_path / f"{name}.json")
    first, second = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b"))
    assert len(first["losses"]) == 3 and first["losses"] == second["losses"]
