"""Issue 15: the GPU path's parts, checked on the CPU: background checkpoints, deferred loss reads, compilation,
the device defaults."""
import logging
import os
import threading

import pytest
import torch

import train as train_script
import trainer
from engine import options
from conftest import train_tiny_run, write_phantom_training_data
from engine.checkpoint_writer import BackgroundCheckpointWriter, CheckpointWriteError, snapshot
from engine.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_path")
    return root, write_phantom_training_data(root, cases=4, seed=3)


def recorded_losses(monkeypatch):
    """The total loss of every step, as the trainer reads them back from the device."""
    losses = []
    original = trainer.Trainer.read_losses

    def read_and_record(self):
        pending = len(self.pending_losses)
        original(self)
        if pending:
            losses.append((pending, self.last_losses[0]))

    monkeypatch.setattr(trainer.Trainer, "read_losses", read_and_record)
    return losses


# Background checkpoints ---------------------------------------------------------------------------------------

def test_one_serialisation_serves_every_name_of_a_save(tmp_path, monkeypatch):
    from engine import checkpoint_writer

    calls = []
    real_save = torch.save
    monkeypatch.setattr(checkpoint_writer.torch, "save", lambda obj, path: (calls.append(path), real_save(obj, path)))
    writer = BackgroundCheckpointWriter()
    state = {"weights": torch.arange(10.0), "step": 3}
    writer.submit(state, [tmp_path / "last.pth", tmp_path / "best.pth", tmp_path / "epoch_3.pth"])
    state["weights"].add_(100)  # training goes on: the snapshot is what gets written
    writer.wait()
    assert len(calls) == 1
    for name in ("last.pth", "best.pth", "epoch_3.pth"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert torch.equal(loaded["weights"], torch.arange(10.0)) and loaded["step"] == 3
    assert os.stat(tmp_path / "best.pth").st_ino == os.stat(tmp_path / "last.pth").st_ino, "a hard link"
    writer.submit({"weights": torch.zeros(2), "step": 4}, [tmp_path / "last.pth"])
    writer.wait()
    assert torch.load(tmp_path / "best.pth", weights_only=True)["step"] == 3, "replacing last.pth leaves best.pth"


def test_a_save_of_last_alone_is_skipped_while_a_write_is_in_flight(tmp_path, monkeypatch):
    from engine import checkpoint_writer

    release = threading.Event()
    real_save = torch.save
    monkeypatch.setattr(checkpoint_writer.torch, "save",
                        lambda obj, path: (release.wait(10), real_save(obj, path)))
    writer = BackgroundCheckpointWriter()
    writer.submit({"step": 1}, [tmp_path / "last.pth"])
    assert writer.busy
    assert writer.submit({"step": 2}, [tmp_path / "last.pth"], skip_if_busy=True) is False
    release.set()
    assert writer.submit({"step": 3}, [tmp_path / "last.pth"]) is True, "waits for the write in flight"
    writer.wait()
    assert torch.load(tmp_path / "last.pth", weights_only=True)["step"] == 3


def test_a_failed_write_is_raised_by_the_next_wait_and_leaves_no_file(tmp_path, monkeypatch):
    from engine import checkpoint_writer

    def read_only(obj, path):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(checkpoint_writer.torch, "save", read_only)
    writer = BackgroundCheckpointWriter()
    writer.submit({"step": 1}, [tmp_path / "last.pth"])
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint .*last.pth.*Read-only"):
        writer.wait()
    assert list(tmp_path.iterdir()) == []
    writer.wait()  # reported once


def test_snapshot_copies_tensors_and_keeps_the_rest():
    state = {"a": torch.ones(3), "nested": [torch.zeros(2), {"b": torch.full((1,), 2.0)}], "epoch": 5}
    copy = snapshot(state)
    state["a"].add_(1)
    state["nested"][1]["b"].add_(1)
    assert torch.equal(copy["a"], torch.ones(3)) and copy["nested"][1]["b"].item() == 2.0 and copy["epoch"] == 5


# Deferred loss reads ------------------------------------------------------------------------------------------

def test_losses_are_read_every_log_every_steps_and_before_each_save(tiny, monkeypatch):
    root, priors = tiny
    losses = recorded_losses(monkeypatch)
    assert train_tiny_run(root / "data", priors, root / "every2", "--max_epochs", "2", "--log_every", "2") == 0
    steps_per_epoch = load_checkpoint(root / "every2" / "last.pth")["train_state"]["iteration"] // 2
    assert steps_per_epoch % 2 == 1, "the phantom gives an odd number of steps per epoch"
    per_epoch = [2] * (steps_per_epoch // 2) + [1]  # every 2 steps, then the rest before the epoch's save
    assert [count for count, _ in losses] == per_epoch * 2


def test_a_non_finite_loss_between_two_reads_names_its_iteration_and_reaches_no_checkpoint(tiny, monkeypatch,
                                                                                         caplog):
    root, priors = tiny
    original = trainer.Trainer.forward_backward

    def poisoned(self, *args):
        output, loss, terms = original(self, *args)
        return output, loss * float("nan") if self.state.iteration == 1 else loss, terms  # the second step

    monkeypatch.setattr(trainer.Trainer, "forward_backward", poisoned)
    assert train_tiny_run(root / "data", priors, root / "poisoned", "--max_epochs", "2", "--log_every", "50") == 1
    assert "non-finite loss at epoch 1, iteration 2" in caplog.text
    assert not (root / "poisoned" / "last.pth").exists()


# Compilation --------------------------------------------------------------------------------------------------

@pytest.fixture
def eager_afterwards():
    yield
    torch.compiler.set_stance("default")


def test_compile_trains_the_testing_configuration_on_the_cpu_like_the_eager_step(tiny, monkeypatch, caplog,
                                                                                 eager_afterwards):
    """Dynamo captures every region and AOT autograd its backward; the loss goes through inductor, as on a GPU (its
    C++ code for the model's regions is left out: minutes on a small CPU; aot_eager runs their captured graphs with
    eager kernels). The first stage trains the modality heads alone, where inductor once returned a loss without
    gradient (its total was an alias of a term returned detached)."""
    root, priors = tiny
    flags = ("--max_epochs", "2", "--start_contrast_epoch", "1", "--region_fusion_start_epoch", "1")
    eager = recorded_losses(monkeypatch)
    assert train_tiny_run(root / "data", priors, root / "eager", *flags) == 0
    monkeypatch.undo()
    monkeypatch.setitem(trainer.COMPILE_BACKENDS, "regions", "aot_eager")
    compiled = recorded_losses(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert train_tiny_run(root / "data", priors, root / "compiled", *flags, "--compile", "on") == 0
    assert "torch.compile failed" not in caplog.text
    assert caplog.text.count("the first step of the stage") == 2, "each stage's compilation timed in the log"
    assert len(compiled) == len(eager) >= 4
    for (_, expected), (_, found) in zip(eager, compiled):
        assert found == pytest.approx(expected, rel=1e-3), "the same draws and the same losses, up to rounding"


def test_a_failed_compilation_warns_and_trains_eagerly_with_the_same_result(tiny, monkeypatch, caplog,
                                                                           eager_afterwards):
    root, priors = tiny

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler for this platform")

    assert train_tiny_run(root / "data", priors, root / "reference", "--max_epochs", "1") == 0
    monkeypatch.setattr(trainer, "COMPILE_BACKENDS", {"regions": broken_backend, "loss": broken_backend})
    with caplog.at_level(logging.WARNING):
        assert train_tiny_run(root / "data", priors, root / "fallback", "--max_epochs", "1", "--compile", "on") == 0
    assert "torch.compile failed" in caplog.text and "--compile off" in caplog.text
    expected, found = (load_checkpoint(root / run / "last.pth")["model"] for run in ("reference", "fallback"))
    assert all(torch.equal(expected[key], found[key]) for key in expected), "the step was redone from its RNG state"


# Device defaults ----------------------------------------------------------------------------------------------

def test_device_defaults_fill_only_what_the_user_left_unset(monkeypatch):
    args = train_script.parse_args(["--dataset", "Phantom"])
    options.resolve_device_defaults(args, "cpu")
    assert (args.amp, args.deterministic, args.compile, args.num_workers, args.log_every) == ("none", 1, "off", 2, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    args = train_script.parse_args(["--dataset", "Phantom"])
    options.resolve_device_defaults(args, "cuda")
    assert (args.amp, args.deterministic, args.compile, args.num_workers, args.log_every) == (
        options.CUDA_DEFAULTS["amp"], options.CUDA_DEFAULTS["deterministic"], options.CUDA_DEFAULTS["compile"], 8, 25)
    typed = train_script.parse_args(["--dataset", "Phantom", "--amp", "none", "--deterministic", "1", "--compile",
                                     "off", "--num_workers", "3", "--log_every", "1"])
    options.resolve_device_defaults(typed, "cuda")
    assert (typed.amp, typed.deterministic, typed.compile, typed.num_workers, typed.log_every) == (
        "none", 1, "off", 3, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert options.loader_workers(True) == 3, "the cores of one process's share, less one"
