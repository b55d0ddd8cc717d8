"""benchmarks/speed.py's training loop, profile and loss trace, the parts gpu_speed.sh's one GPU run relies on,
run on the CPU with the testing configuration (the figures themselves are machine-dependent and not checked).
The measurements run here, in the test's process (the script runs each in a fresh one, only to time it alone)."""

import pytest

from benchmarks import speed
from conftest import write_phantom_training_data

# 32 px slices, 4 a batch: a few cheap steps per epoch (the loop's plumbing, not its figures, is under test)
SPEED = ["--vit_name", "testing", "--img_size", "32", "--batch_size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_loop")
    write_phantom_training_data(root, cases=3, seed=12)
    return root / "data"


def arguments(*args):
    return speed.parse_args([*SPEED, *map(str, args)])


def test_the_loop_is_timed_per_stage_with_its_save_and_profiled(data, tmp_path):
    figures = speed.measure_loop(arguments("--loop_data", data, "--loop_warmup_epochs", "1", "--loop_epochs", "1",
                                           "--profile", tmp_path / "p.txt"))
    assert figures["loop_s"] > 0 and figures["loop_iterations_per_epoch"] >= 1
    assert len(figures["loop_stages"]) == 3, "modality heads, + contrast, fused head"
    assert figures["last_write_s"] is not None and figures["profile"]["steps"] == 5
    assert "Name" in (tmp_path / "p.txt").read_text()


def test_the_losses_of_the_first_steps_repeat_from_the_seed(data):
    first, second = (speed.trace_losses(arguments("--loop_data", data, "--trace_losses", "3", "--deterministic", "1"))
                     for _ in range(2))
    assert len(first["losses"]) == 3 and first["losses"] == second["losses"]
