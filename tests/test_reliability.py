"""Issue 12: run folders, resume and outputs that never lie (CPU, phantom, `testing` configuration)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import preprocess_data
import test as test_script
from engine import evaluation
import train as train_script
import trainer
import utils
from datasets import phantom
from priors import encode as encode_priors
from conftest import ROOT, preprocess_phantom, write_test_priors
from engine.checkpoints import load_checkpoint

STEPS_PER_EPOCH = 3  # 28 training slices of the workspace at batch 8
ONE_EPOCH = ("--max_epochs", "1", "--region_fusion_start_epoch", "0")  # a run of one epoch that trains its fused head


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    preprocess_phantom(root, 6, 11, "--test_every", "6", "--val_fraction", "0.2")
    for seed, name in ((0, "priors.pt"), (1, "other_priors.pt")):
        write_test_priors(root, name, seed)
    return root


def train_args(workspace, run, *extra):
    return ["--dataset", "Phantom", "--root_path", str(workspace / "data"), "--vit_name", "testing",
            "--img_size", "64", "--no_pretrain", "--prior_embeddings", str(workspace / "priors.pt"),
            "--batch_size", "8", "--start_contrast_epoch", "0", "--region_fusion_start_epoch", "1",
            "--num_workers", "2", "--progress", "0", "--max_epochs", "2", "--output_dir", str(workspace / run),
            *extra]


@pytest.fixture(scope="module")
def straight(workspace):
    """An uninterrupted two-epoch run with two loader workers."""
    assert train_script.main(train_args(workspace, "straight", "--save_every", "1")) == 0
    return workspace / "straight"


def assert_same_run(expected_dir, found_dir):
    expected, found = load_checkpoint(expected_dir / "last.pth"), load_checkpoint(found_dir / "last.pth")
    assert found["train_state"] == expected["train_state"], "same epoch, iteration and best metric"
    assert found["optimizer"]["param_groups"][0]["lr"] == expected["optimizer"]["param_groups"][0]["lr"]
    assert expected["model"].keys() == found["model"].keys()
    differing = [k for k in expected["model"] if not torch.equal(expected["model"][k], found["model"][k])]
    assert not differing, f"resuming must reproduce the weights exactly; differing: {differing[:5]}"


def interrupt_at(monkeypatch, iteration, signal_number):
    """Send the training process a real signal right after its step number ``iteration``."""
    original = trainer.Trainer.train_step

    def step_then_signal(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.state.iteration == iteration:
            os.kill(os.getpid(), signal_number)
        return result

    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_signal)


# Run folders --------------------------------------------------------------------------------------------------

def test_checkpoints_and_config_record_the_training_data_preprocessing(straight):
    for record in (load_checkpoint(straight / "last.pth")["preprocessing"],
                   json.loads((straight / "config.json").read_text())["preprocessing"]):
        assert record["modalities"] == ["bSSFP", "LGE", "T2w"]
        assert record["settings"]["crop_size"] == 64 and record["settings"]["spacing_mm"] == 2.0


def test_run_files_are_as_readable_as_files_opened_normally(workspace, straight, monkeypatch):
    """Atomic writes go through mkstemp (0600): the files must still get 0666 less the umask, as open() gives."""
    plain = workspace / "plain.txt"
    plain.write_text("written by open()")
    expected = plain.stat().st_mode & 0o777
    written = [path for path in straight.rglob("*") if path.is_file()]
    assert {"last.pth", "config.json"} <= {path.name for path in written}
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in written}
    assert set(modes.values()) == {oct(expected)}, modes
    monkeypatch.setattr(utils, "_UMASK", 0o027)
    with utils.atomic_path(workspace / "group_only.txt") as temporary:
        temporary.write_text("group may read")
    assert (workspace / "group_only.txt").stat().st_mode & 0o777 == 0o640


def test_a_run_folder_with_checkpoints_is_refused_unless_resume_or_overwrite(workspace, straight, caplog):
    run = workspace / "reused"
    shutil.copytree(straight, run)
    (run / "notes.txt").write_text("my notes")
    (run / "test_test_vol_best").mkdir()
    (run / "test_test_vol_best" / "summary.json").write_text("{}")
    before = {path.name: path.read_bytes() for path in run.glob("*.pth")}
    assert train_script.main(train_args(workspace, "reused", *ONE_EPOCH)) == 1
    assert f"run folder {run} already holds checkpoints" in caplog.text
    assert "--resume auto" in caplog.text and "--overwrite" in caplog.text
    assert {path.name: path.read_bytes() for path in run.glob("*.pth")} == before, "nothing was touched"

    assert train_script.main(train_args(workspace, "reused", *ONE_EPOCH, "--overwrite")) == 0
    assert sorted(path.name for path in run.glob("*.pth")) == ["best.pth", "epoch_0.pth", "last.pth"]
    assert load_checkpoint(run / "last.pth")["train_state"]["epoch"] == 1
    assert not (run / "test_test_vol_best").exists() and (run / "notes.txt").read_text() == "my notes"
    assert "epoch 2" not in (run / "log.txt").read_text(), "the earlier run's log was cleared"


def test_resume_with_another_prior_file_is_refused(workspace, straight, caplog):
    code = train_script.main(train_args(workspace, "other_priors", "--resume", str(straight / "epoch_0.pth"),
                                        "--prior_embeddings", str(workspace / "other_priors.pt")))
    assert code == 1
    assert "other text priors" in caplog.text and "embeddings_sha256" in caplog.text
    assert not (workspace / "other_priors").exists()


def test_a_run_folder_in_use_is_refused_and_a_dead_processs_lock_is_taken_over(workspace, caplog):
    run = workspace / "locked"
    run.mkdir()
    lock = run / "train.lock"
    here = socket.gethostname()
    for holder in ({"pid": os.getpid(), "host": here}, {"pid": 1, "host": "another-machine"}):
        lock.write_text(json.dumps({**holder, "started": "earlier"}))
        assert train_script.main(train_args(workspace, "locked", *ONE_EPOCH)) == 1
        assert f"{lock} names process {holder['pid']} on {holder['host']}" in caplog.text
        assert [path.name for path in run.iterdir()] == ["train.lock"], "nothing written beside the other run"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(ended.stdout), "host": here, "started": "earlier"}))
    assert train_script.main(train_args(workspace, "locked", *ONE_EPOCH)) == 0
    assert f"was left by process {int(ended.stdout)}, which no longer runs: taking it over" in caplog.text
    assert (run / "last.pth").is_file() and not lock.exists(), "the lock goes with the run that held it"
    assert train_script.main(train_args(workspace, "fresh_but_failing", *ONE_EPOCH, "--prior_embeddings",
                                        str(workspace / "priors_missing.pt"), "--prior_encoder", "nonexistent")) == 1
    assert not (workspace / "fresh_but_failing").exists(), "a folder created for a run that failed at once is removed"


@pytest.mark.parametrize("root", ["missing", "empty"])
def test_bad_root_path_leaves_no_run_folder(workspace, root, caplog):
    (workspace / "empty").mkdir(exist_ok=True)
    args = train_args(workspace, f"no_data_{root}")
    args[args.index("--root_path") + 1] = str(workspace / root)
    assert train_script.main(args) == 1
    assert str(workspace / root) in caplog.text
    assert not (workspace / f"no_data_{root}").exists()


# Resume -------------------------------------------------------------------------------------------------------

def test_resume_with_loader_workers_reproduces_the_uninterrupted_run(workspace, straight):
    assert train_script.main(train_args(workspace, "resumed", "--resume", str(straight / "epoch_0.pth"))) == 0
    assert_same_run(straight, workspace / "resumed")


@pytest.mark.parametrize("signal_number, iteration", [(signal.SIGINT, STEPS_PER_EPOCH + 1), (signal.SIGTERM, 2)],
                         ids=["SIGINT in epoch 2", "SIGTERM in epoch 1"])
def test_a_signal_mid_epoch_saves_the_position_and_resume_matches_the_uninterrupted_run(
        workspace, straight, monkeypatch, signal_number, iteration):
    name = f"stopped_{signal.Signals(signal_number).name}"

    def unhandled(number, frame):
        raise RuntimeError(f"{signal.Signals(number).name} reached the test: train.py does not handle it")

    previous = signal.signal(signal_number, unhandled)
    try:
        with monkeypatch.context() as patch:
            interrupt_at(patch, iteration, signal_number)
            assert train_script.main(train_args(workspace, name)) == 128 + signal_number
    finally:
        signal.signal(signal_number, previous)
    checkpoint = load_checkpoint(workspace / name / "last.pth")
    assert checkpoint["interrupted"] and checkpoint["train_state"]["iteration"] == iteration
    assert checkpoint["train_state"]["epoch_iteration"] == iteration % STEPS_PER_EPOCH
    other_batch = train_args(workspace, name, "--resume", "auto") + ["--batch_size", "4"]
    assert train_script.main(other_batch) == 1, "a mid-epoch position counted in batches of 8 cannot go on at 4"
    assert load_checkpoint(workspace / name / "last.pth")["train_state"] == checkpoint["train_state"]
    assert train_script.main(train_args(workspace, name, "--resume", "auto")) == 0
    assert_same_run(straight, workspace / name)


SIGTERM_ON_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train, trainer

original = trainer.Trainer.train_step


def step_then_signal(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    if self.ctx.rank == 1 and self.state.iteration == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return result


trainer.Trainer.train_step = step_then_signal
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(workspace, tmp_path):
    script = tmp_path / "sigterm_on_rank_1.py"
    script.write_text(SIGTERM_ON_RANK_1.format(root=str(ROOT)))
    args = train_args(workspace, "ddp_stopped", "--batch_size", "4", "--num_workers", "0")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(30500 + os.getpid() % 1000), str(script), *args]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    checkpoint = load_checkpoint(workspace / "ddp_stopped" / "last.pth")
    assert checkpoint["interrupted"] and checkpoint["train_state"]["iteration"] == 2, result.stderr[-3000:]
    assert len(checkpoint["rng"]) == 2, "both ranks took part in the save"
    assert "SIGTERM: stopped in epoch 1 after 2 of its 3 steps" in (workspace / "ddp_stopped" / "log.txt").read_text()


def test_a_corrupt_last_checkpoint_names_an_older_one(workspace, straight, caplog):
    run = workspace / "corrupt"
    shutil.copytree(straight, run)
    (run / "last.pth").write_bytes((run / "last.pth").read_bytes()[:1000])
    assert train_script.main(train_args(workspace, "corrupt", "--max_epochs", "3", "--resume", "auto")) == 1
    assert "not readable" in caplog.text and f"--resume {run / 'epoch_1.pth'}" in caplog.text


# test.py ------------------------------------------------------------------------------------------------------

@pytest.fixture
def evaluation_data(tmp_path):
    """Two test-only phantom cases preprocessed as the workspace's training data."""
    def make(*extra):
        preprocess_phantom(tmp_path, 2, 5, "--test_every", "1", *extra)
        return tmp_path
    return make


def test_predictions_are_written_in_the_original_geometry_without_a_readable_label(straight, evaluation_data):
    root = evaluation_data()
    labels = root / "raw" / "Raw_data" / "label"
    (labels / "case0001_gt.nii.gz").unlink()
    (labels / "case0002_gt.nii.gz").write_bytes(b"not a NIfTI file")
    out = root / "out"
    assert test_script.main(["--output_dir", str(straight), "--root_path", str(root / "data"),
                             "--test_save_dir", str(out)]) == 0
    for case in ("case0001", "case0002"):
        source = nib.load(str(root / "raw" / "Raw_data" / "LGE" / f"{case}.nii.gz"))
        prediction = nib.load(str(out / f"{case}_pred.nii.gz"))
        assert prediction.shape == source.shape and np.allclose(prediction.affine, source.affine)
    summary = json.loads((out / "summary.json").read_text())
    assert {entry["space"] for entry in summary.values()} == {"processed"}


def test_a_source_label_of_another_shape_is_an_error_naming_case_and_file(straight, evaluation_data, caplog):
    root = evaluation_data()
    label = root / "raw" / "Raw_data" / "label" / "case0002_gt.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), np.eye(4)), str(label))
    assert test_script.main(["--output_dir", str(straight), "--root_path", str(root / "data"),
                             "--test_save_dir", str(root / "out")]) == 1
    assert f"case0002: source label {label} has shape (5, 6, 7)" in caplog.text


def test_test_data_preprocessed_otherwise_is_refused_unless_allowed(straight, evaluation_data, caplog):
    root = evaluation_data("--percentiles", "1", "99")
    command = ["--output_dir", str(straight), "--root_path", str(root / "data"), "--test_save_dir", str(root / "out"),
               "--no_save_nii"]
    assert test_script.main(command) == 1
    assert "percentiles: [0.5, 99.5] in the training data, [1.0, 99.0] here" in caplog.text
    assert not (root / "out" / "summary.json").exists()
    assert test_script.main(command + ["--allow_preprocessing_mismatch"]) == 0
    assert (root / "out" / "summary.json").is_file()


def test_split_val_without_validation_cases_is_an_error(straight, evaluation_data, caplog):
    root = evaluation_data()
    assert test_script.main(["--output_dir", str(straight), "--root_path", str(root / "data"), "--split", "val",
                             "--test_save_dir", str(root / "out")]) == 1
    assert "the val list" in caplog.text and "names no volumes" in caplog.text


# Data folders -------------------------------------------------------------------------------------------------

def preprocess(source, destination, *extra):
    return preprocess_data.main(["--dataset", "Phantom", "--src_path", str(source), "--dst_path", str(destination),
                                 "--spacing", "2.0", "--crop_size", "32", "--test_every", "2", *extra])


def test_preprocessing_refuses_to_delete_what_it_did_not_write(workspace, tmp_path, caplog):
    destination = tmp_path / "data"
    assert preprocess(workspace / "raw", destination) == 0
    assert preprocess(workspace / "raw", destination) == 0, "a previous output alone is replaced"
    (destination / "notes.txt").write_text("keep me")
    split_file = destination / "split.json"
    split_file.write_text(json.dumps({"test": ["case0001"]}))
    assert preprocess(workspace / "raw", destination, "--split_file", str(split_file)) == 1
    assert "notes.txt" in caplog.text and "split.json" in caplog.text
    assert (destination / "notes.txt").read_text() == "keep me" and split_file.is_file()


def test_preprocessing_into_a_file_is_a_clear_error(workspace, tmp_path, caplog):
    target = tmp_path / "data"
    target.write_text("a file")
    assert preprocess(workspace / "raw", target) == 1
    assert f"--dst_path {target} is a file" in caplog.text


def test_stale_staging_folders_of_dead_processes_are_removed(workspace, tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale, live = tmp_path / f".data.staging-{finished.pid}", tmp_path / f".data.staging-{running.pid}"
        for folder in (stale, live):
            (folder / "LGE").mkdir(parents=True)
            (folder / "LGE" / "half.npz").write_bytes(b"half written")
        assert preprocess(workspace / "raw", tmp_path / "data") == 0
        assert not stale.exists() and live.is_dir()
    finally:
        running.kill()
        running.wait()


def test_phantom_refuses_to_overwrite_cases_unless_asked(tmp_path, caplog):
    assert phantom.main(["--out", str(tmp_path), "--cases", "1", "--seed", "1"]) == 0
    label = tmp_path / "Raw_data" / "label" / "case0001_gt.nii.gz"
    before = label.read_bytes()
    assert phantom.main(["--out", str(tmp_path), "--cases", "1", "--seed", "2"]) == 1
    assert "--overwrite" in caplog.text and label.read_bytes() == before
    assert phantom.main(["--out", str(tmp_path), "--cases", "1", "--seed", "2", "--overwrite"]) == 0
    assert label.read_bytes() != before


def test_prior_import_of_a_non_tensor_entry_is_a_clear_error(tmp_path, caplog):
    source = tmp_path / "plain.pt"
    torch.save({"modality": [[0.0] * 8] * 3, "class": torch.zeros(4, 8)}, source)
    assert encode_priors.main(["--import", str(source), "--out", str(tmp_path / "priors.pt")]) == 1
    assert "'modality' must be a tensor, got list" in caplog.text
    assert not (tmp_path / "priors.pt").exists()


def test_prior_output_pointing_at_a_folder_is_a_clear_error(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        encode_priors.main(["--import", str(workspace / "plain_priors.pt"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


# Background checkpoints (issue 15) ----------------------------------------------------------------------------

KILLED_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
import train
from engine import checkpoint_writer

real_save, saves = torch.save, []


def save_then_die(state, path, *args, **kwargs):
    saves.append(path)
    if len(saves) < 2:
        return real_save(state, path, *args, **kwargs)
    with open(path, "wb") as handle:  # half of a checkpoint, then the process is killed
        handle.write(b"PK\\x03\\x04" + bytes(4096))
    os.kill(os.getpid(), signal.SIGKILL)


checkpoint_writer.torch.save = save_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_kill_during_a_background_save_leaves_the_previous_last_checkpoint_loadable(workspace, straight, tmp_path):
    script = tmp_path / "killed_during_save.py"
    script.write_text(KILLED_DURING_SAVE.format(root=str(ROOT)))
    args = train_args(workspace, "killed", "--num_workers", "0", "--save_every", "1")
    result = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    run = workspace / "killed"
    checkpoint = load_checkpoint(run / "last.pth")
    assert checkpoint["train_state"]["epoch"] == 1, "the first epoch's last.pth, whole"
    assert sorted(path.name for path in run.glob("*.pth")) == ["epoch_0.pth", "last.pth"]
    assert [path.name.split(".")[1] for path in run.glob(".*.tmp")] == ["last"], "the cut write's temporary file"
    assert train_script.main(train_args(workspace, "killed", "--save_every", "1", "--resume", "auto")) == 0
    assert_same_run(straight, run)
    assert not list(run.glob(".*.tmp")), "the resumed run removed the cut write's temporary file"


def slow_saves(monkeypatch, seconds, log):
    """Make every checkpoint write of engine.checkpoint_writer take ``seconds`` longer; ``log`` records their ends."""
    from engine import checkpoint_writer

    real_save = torch.save

    def slow_save(state, path, *args, **kwargs):
        import time
        time.sleep(seconds)
        real_save(state, path, *args, **kwargs)
        log.append(state["train_state"]["iteration"])

    monkeypatch.setattr(checkpoint_writer.torch, "save", slow_save)


def test_a_stop_signal_waits_for_the_checkpoint_being_written(workspace, straight, monkeypatch):
    written = []
    slow_saves(monkeypatch, 1.0, written)
    interrupt_at(monkeypatch, STEPS_PER_EPOCH + 1, signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        assert train_script.main(train_args(workspace, "stopped_while_saving", "--save_every", "1")) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    # the epoch-1 save was still being written at the signal: it completed, then the stop's save
    assert written == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1]
    run = workspace / "stopped_while_saving"
    assert load_checkpoint(run / "epoch_0.pth")["train_state"]["iteration"] == STEPS_PER_EPOCH
    last = load_checkpoint(run / "last.pth")
    assert last["interrupted"] and last["train_state"]["iteration"] == STEPS_PER_EPOCH + 1
    monkeypatch.undo()
    assert train_script.main(train_args(workspace, "stopped_while_saving", "--save_every", "1", "--resume",
                                        "auto")) == 0
    assert_same_run(straight, run)


def test_a_failed_checkpoint_write_stops_training_with_a_named_error_and_keeps_the_previous_file(
        workspace, monkeypatch, caplog):
    from engine import checkpoint_writer

    real_save, calls = torch.save, []

    def no_space_left(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_writer.torch, "save", no_space_left)
    assert train_script.main(train_args(workspace, "full_disk", "--max_epochs", "3")) == 1
    run = workspace / "full_disk"
    assert "could not write checkpoint" in caplog.text and "No space left on device" in caplog.text
    assert load_checkpoint(run / "last.pth")["train_state"]["epoch"] == 1
    assert not list(run.glob(".*.tmp")), "no half-written file is left behind"


# Runs never mix, names users typed (issue 17) -----------------------------------------------------------------

def test_resuming_another_runs_checkpoint_into_a_folder_with_checkpoints_is_refused_unless_overwrite(
        workspace, straight, caplog):
    run = workspace / "mixed"
    shutil.copytree(straight, run)
    before = {path.name: path.read_bytes() for path in run.glob("*.pth")}
    other = workspace / "other_run"
    shutil.copytree(straight, other)
    assert train_script.main(train_args(workspace, "mixed", "--resume", str(other / "epoch_0.pth"))) == 1
    assert f"--resume {other / 'epoch_0.pth'} continues another run's checkpoint in run folder {run}" in caplog.text
    assert "--overwrite" in caplog.text
    assert {path.name: path.read_bytes() for path in run.glob("*.pth")} == before, "nothing was touched"
    assert train_script.main(train_args(workspace, "mixed", "--resume", str(other / "epoch_0.pth"),
                                        "--overwrite")) == 0
    assert_same_run(straight, run)
    assert train_script.main(train_args(workspace, "mixed", "--resume", str(run / "epoch_1.pth"),
                                        "--max_epochs", "3")) == 0, "a run continues its own checkpoints"
    with pytest.raises(SystemExit):  # --overwrite would delete what --resume continues from
        train_script.parse_args(train_args(workspace, "mixed", "--resume", str(run / "epoch_1.pth"), "--overwrite"))


def test_the_myops380_dataset_is_read_under_both_of_its_names(tmp_path):
    for name in ("Myops", "MyoPS380", "myops380"):
        assert train_script.parse_args(["--dataset", name]).dataset == "Myops"
        assert test_script.parse_args(["--dataset", name]).dataset == "Myops"
        assert preprocess_data.parse_args(["--dataset", name, "--src_path", str(tmp_path), "--dst_path",
                                           str(tmp_path / "out")]).dataset == "MyoPS380"
    assert train_script.parse_args(["--dataset", "Myops"]).root_path.name == "MyoPS380"
    with pytest.raises(SystemExit):
        train_script.parse_args(["--dataset", "MyoPS2021"])


def test_test_results_of_different_settings_never_share_a_folder(workspace, straight, evaluation_data, caplog):
    data = evaluation_data()
    common = ["--output_dir", str(straight), "--root_path", str(data / "data"), "--checkpoint", "last"]
    assert test_script.main(common) == 0
    assert test_script.main(common + ["--tta", "--protocol", "released"]) == 0
    assert (straight / "test_test_vol_last" / "summary.json").is_file()
    assert (straight / "test_test_vol_last_tta_released" / "summary_released_protocol.json").is_file()
    assert not (straight / "test_test_vol_last" / "summary_released_protocol.json").exists()

    chosen = workspace / "chosen_folder"
    assert test_script.main(common + ["--test_save_dir", str(chosen), "--protocol", "released", "--save_png"]) == 0
    before = sorted(path.name for path in chosen.iterdir())
    assert "summary_released_protocol.json" in before and any(name.endswith(".png") for name in before)
    assert test_script.main(common + ["--test_save_dir", str(chosen), "--tta"]) == 1
    assert "holds the results of another setting (tta False there, True here; protocol 'released' there" in caplog.text
    assert sorted(path.name for path in chosen.iterdir()) == before, "nothing was touched"
    assert test_script.main(common + ["--test_save_dir", str(chosen), "--tta", "--overwrite"]) == 0
    after = sorted(path.name for path in chosen.iterdir())
    assert "summary_released_protocol.json" not in after and not any(name.endswith(".png") for name in after)
    assert json.loads((chosen / "test_info.json").read_text())["tta"] is True
    assert test_script.main(common + ["--test_save_dir", str(chosen), "--tta"]) == 0, "the same setting again"


def test_a_case_that_cannot_be_scored_is_named_and_the_others_are_scored(straight, evaluation_data, monkeypatch,
                                                                        caplog):
    data = evaluation_data()
    original = evaluation.reference_in_original_space
    failing = sorted((data / "data" / "test_vol.txt").read_text().split())[0]

    def fails_for_one_case(volume):
        if volume["case_name"] == failing:
            raise RuntimeError("the label could not be resampled")
        return original(volume)

    monkeypatch.setattr(evaluation, "reference_in_original_space", fails_for_one_case)
    out = data / "scored"
    assert test_script.main(["--output_dir", str(straight), "--root_path", str(data / "data"), "--checkpoint", "last",
                             "--test_save_dir", str(out)]) == 1, "the exit status says that a case failed"
    assert f"{failing}: left out: RuntimeError: the label could not be resampled" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scar"]["n_left_out"] == 1 and summary["scar"]["n"] == 1
    assert json.loads((out / "test_info.json").read_text())["left_out"] == {
        failing: "RuntimeError: the label could not be resampled"}
    assert failing not in (out / "metrics.csv").read_text() and not (out / f"{failing}_pred.nii.gz").exists()


def test_a_stop_signal_during_validation_stops_after_the_current_volume_and_saves(workspace, monkeypatch, caplog):
    calls = []
    original = trainer.predict_volume

    def predict_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "predict_volume", predict_then_signal)
    validation = trainer.MyoPSDataset(workspace / "data", workspace / "data", "val")
    three_volumes = torch.utils.data.ConcatDataset([validation] * 3)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # the workspace has one validation volume: three copies of it show where validation stops
        monkeypatch.setattr(trainer, "MyoPSDataset", lambda root, lists, split: (
            three_volumes if split == "val" else validation.__class__(root, lists, split)))
        assert train_script.main(train_args(workspace, "stopped_validating", "--max_epochs", "3",
                                            "--val_every", "1")) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) == 1, "validation stopped after the volume in progress"
    assert "SIGTERM during the validation of epoch 2: validation stopped after the current volume" in caplog.text
    last = load_checkpoint(workspace / "stopped_validating" / "last.pth")
    assert last["interrupted"] and last["train_state"]["epoch"] == 2 and last["train_state"]["epoch_iteration"] == 0
    monkeypatch.undo()
    assert train_script.main(train_args(workspace, "stopped_validating", "--max_epochs", "3", "--val_every", "1",
                                        "--resume", "auto")) == 0
    assert load_checkpoint(workspace / "stopped_validating" / "last.pth")["train_state"]["epoch"] == 3


def test_a_stop_signal_during_testing_stops_after_the_current_case_and_writes_what_was_scored(
        straight, evaluation_data, monkeypatch, caplog):
    data = evaluation_data()
    original = evaluation.score_case

    def score_then_signal(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(evaluation, "score_case", score_then_signal)
    out = data / "stopped_scoring"
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        assert test_script.main(["--output_dir", str(straight), "--root_path", str(data / "data"), "--checkpoint",
                                 "last", "--test_save_dir", str(out)]) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "SIGTERM: scoring stopped after 1 of 2 cases" in caplog.text
    assert json.loads((out / "summary.json").read_text())["scar"]["n"] == 1
    assert json.loads((out / "test_info.json").read_text())["stopped_after"] == 1


EXIT_WITH_THE_TRAINER_HELD = """
import sys
sys.path.insert(0, {root!r})
import train, trainer


def fail(self):
    raise RuntimeError("an error after an epoch")


trainer.Trainer.end_epoch = fail
try:
    train.main(sys.argv[1:])
except RuntimeError as error:
    kept = error  # its traceback holds the trainer and its loader until the interpreter exits
print("exiting", flush=True)
"""


def test_the_process_exits_while_an_error_still_holds_the_trainer(workspace, tmp_path):
    """Loader workers ignore stop signals; the interpreter's exit ends its children with SIGTERM and waits for them,
    so workers still alive at exit would hang it: fit ends them however it ends."""
    script = tmp_path / "exit_with_the_trainer_held.py"
    script.write_text(EXIT_WITH_THE_TRAINER_HELD.format(root=str(ROOT)))
    result = subprocess.run([sys.executable, str(script), *train_args(workspace, "held", "--num_workers", "2")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr[-3000:]
