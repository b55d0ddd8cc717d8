"""train.py and test.py end to end on a small phantom with the tiny configuration (CPU)."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import test as test_script
import train as train_script
from conftest import ROOT, preprocess_phantom, write_test_priors
from engine.checkpoints import load_checkpoint
from utils import case_metrics, dice_hd95, summarise


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    preprocess_phantom(root, 6, 11, "--test_every", "6", "--val_fraction", "0.2")
    write_test_priors(root)
    return root


ONE_EPOCH = ("--max_epochs", "1", "--region_fusion_start_epoch", "0")  # one epoch that trains the fused head


def train_args(workspace, run, *extra):
    return ["--dataset", "Phantom", "--root_path", str(workspace / "data"), "--vit_name", "testing",
            "--img_size", "64", "--no_pretrain", "--prior_embeddings", str(workspace / "priors.pt"),
            "--batch_size", "4", "--start_contrast_epoch", "0", "--region_fusion_start_epoch", "1",
            "--num_workers", "0", "--progress", "0", "--output_dir", str(workspace / run), *extra]


def weights(path):
    return load_checkpoint(path)["model"]


def test_resumed_run_matches_an_uninterrupted_one(workspace):
    assert train_script.main(train_args(workspace, "straight", "--max_epochs", "2", "--save_every", "1")) == 0
    straight = workspace / "straight"
    assert (straight / "epoch_0.pth").is_file() and (straight / "epoch_1.pth").is_file()
    assert train_script.main(train_args(workspace, "resumed", "--max_epochs", "2", "--resume",
                                        str(straight / "epoch_0.pth"))) == 0
    first, second = weights(straight / "last.pth"), weights(workspace / "resumed" / "last.pth")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "resuming must reproduce the weights exactly"
    checkpoint = load_checkpoint(straight / "last.pth")
    assert checkpoint["train_state"]["epoch"] == 2 and checkpoint["spec"]["config"]["name"] == "testing"
    assert checkpoint["priors"]["origin"].endswith("random test priors") and len(checkpoint["rng"]) == 1
    config = json.loads((straight / "config.json").read_text())
    assert config["spec"]["img_size"] == 64 and config["args"]["batch_size"] == 4
    assert (straight / "log.txt").read_text().count("validation mean pathology Dice") == 1
    assert any((straight / "log").iterdir()), "TensorBoard events are written"


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(workspace, caplog):
    assert train_script.main(train_args(workspace, "nan", *ONE_EPOCH)) == 0
    last = workspace / "nan" / "last.pth"
    before = last.read_bytes()
    code = train_script.main(train_args(workspace, "nan", "--max_epochs", "3", "--base_lr", "1e30",
                                        "--resume", "auto"))
    assert code == 1
    assert "non-finite loss at epoch 2, iteration" in caplog.text
    assert last.read_bytes() == before


def test_dice_class_weights_flag_sets_the_trainers_loss_and_bad_values_are_refused(workspace, capsys):
    from engine.distributed import setup_distributed
    from engine.training import build
    from trainer import Trainer
    args = train_script.parse_args(train_args(workspace, "scar_weighted", "--dice_class_weights", "0.5,1,2,1"))
    ctx = setup_distributed("cpu")
    model, spec, _ = build(args, ctx)
    trainer = Trainer(args, ctx, model, spec, workspace / "scar_weighted")
    assert trainer.criterion.segmentation.dice.class_weights.tolist() == [0.5, 1.0, 2.0, 1.0]
    for bad, message in (("0.5,1,2", "3 weights for --num_classes 4"), ("0.5,1,two,1", "comma-separated numbers"),
                         ("0.5,-1,2,1", "non-negative"), ("0,0,0,0", "not all zero"), ("0.5,nan,1,1", "finite")):
        with pytest.raises(SystemExit):
            train_script.parse_args(train_args(workspace, "refused", "--dice_class_weights", bad))
        assert message in capsys.readouterr().err
    assert not (workspace / "refused").exists()


def test_resume_from_another_configuration_is_refused(workspace, caplog):
    assert train_script.main(train_args(workspace, "other", *ONE_EPOCH)) == 0
    code = train_script.main(train_args(workspace, "other_resumed", "--max_epochs", "2", "--n_skip", "2",
                                        "--resume", str(workspace / "other" / "last.pth")))
    assert code == 1 and "another configuration" in caplog.text and "n_skip: 3 in the checkpoint, 2 here" in caplog.text


def test_test_script_writes_metrics_predictions_and_overlays(workspace):
    run = workspace / "straight"
    if not (run / "last.pth").is_file():
        assert train_script.main(train_args(workspace, "straight", "--max_epochs", "2", "--save_every", "1")) == 0
    out = workspace / "evaluation"
    assert test_script.main(["--output_dir", str(run), "--test_save_dir", str(out), "--save_png"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"myocardium", "scar", "edema", "scar_edema", "whole_myocardium"}
    for entry in summary.values():
        assert {"dice", "dice_std", "hd95", "hd95_std", "n", "n_undefined_hd95"} <= set(entry)
        assert entry["n"] == 1
    assert summary["whole_myocardium"]["dice"] is not None and math.isfinite(summary["whole_myocardium"]["dice"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 5 and {row["space"] for row in rows} == {"original"}
    info = json.loads((out / "test_info.json").read_text())
    assert info["checkpoint"].endswith("best.pth")
    prediction = __import__("nibabel").load(str(out / "case0001_pred.nii.gz"))
    source = __import__("nibabel").load(str(workspace / "raw" / "Raw_data" / "label" / "case0001_gt.nii.gz"))
    assert prediction.shape == source.shape and np.allclose(prediction.affine, source.affine)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 3}
    assert (out / "case0001.png").is_file()


def test_test_script_refuses_contradicting_flags(workspace, caplog):
    run = workspace / "other"
    if not (run / "last.pth").is_file():
        assert train_script.main(train_args(workspace, "other", *ONE_EPOCH)) == 0
    assert test_script.main(["--output_dir", str(run), "--vit_name", "compact", "--no_cfm"]) == 1
    assert "--vit_name compact (the checkpoint has testing)" in caplog.text and "--no_cfm" in caplog.text
    assert test_script.main(["--output_dir", str(run), "--checkpoint", str(run / "absent.pth")]) == 1


def test_test_script_takes_the_training_command_and_ignores_what_it_does_not_use(workspace, caplog):
    run = workspace / "other"
    if not (run / "last.pth").is_file():
        assert train_script.main(train_args(workspace, "other", *ONE_EPOCH)) == 0
    training_command = train_args(workspace, "other", *ONE_EPOCH, "--augmentation", "strong", "--compile", "off",
                                  "--weight_decay", "0.0001", "--prior_encoder", "offline")
    caplog.set_level("INFO")
    out = workspace / "scored_with_training_flags"
    assert test_script.main([*training_command, "--test_save_dir", str(out)]) == 0
    assert (out / "summary.json").is_file()
    ignored = next(r.getMessage() for r in caplog.records if "testing does not use, ignored" in r.getMessage())
    assert "--augmentation strong" in ignored and "--prior_embeddings" in ignored and "--dataset" not in ignored
    with pytest.raises(SystemExit):
        test_script.parse_args([*training_command, "--augmentaton", "strong"])  # neither script's flag


def scalar_events(folder):
    """{tag: [steps]} of the TensorBoard event files in ``folder`` (tensorboardX's records, read without TensorBoard)."""
    import struct

    from tensorboardX.proto import event_pb2

    steps = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_two_process_ddp_on_cpu(workspace):
    """Two ranks (gloo) through two stages, the losses read every 3 steps as on a GPU: one writer (rank 0) logs
    every step's loss and terms, saves and validates."""
    run = workspace / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), str(ROOT / "train.py"),
               *train_args(workspace, "ddp", "--max_epochs", "2", "--start_contrast_epoch", "1",
                           "--region_fusion_start_epoch", "1", "--val_every", "1", "--batch_size", "2",
                           "--log_every", "3")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(run / "last.pth")
    assert len(checkpoint["rng"]) == 2, "each rank's random state is kept"
    assert sorted(p.name for p in run.glob("*.pth")) == ["best.pth", "epoch_1.pth", "last.pth"], "validated once"
    assert "2 process(es)" in (run / "log.txt").read_text()
    assert len(list((run / "log").glob("events.out.tfevents.*"))) == 1, "rank 0 alone writes TensorBoard events"
    iterations, per_epoch = checkpoint["train_state"]["iteration"], checkpoint["train_state"]["iteration"] // 2
    events = scalar_events(run / "log")
    assert sorted(events["loss/total"]) == list(range(1, iterations + 1)), "every step's loss, read in threes"
    assert sorted(events["loss/fused"]) == list(range(per_epoch + 1, iterations + 1)), "the second stage's term"
    assert [entry["epoch"] for entry in checkpoint["train_state"]["history"]] == [1, 2]


def test_dice_and_hd95_on_hand_computed_cases():
    reference = np.zeros((10, 10, 3), bool)
    reference[2:6, 2:6, 1] = True  # 16 voxels
    prediction = np.zeros_like(reference)
    prediction[2:6, 3:7, 1] = True  # shifted by one column: overlap 12
    dice, hd = dice_hd95(prediction, reference, spacing=(0.5, 2.0, 10.0))
    assert dice == pytest.approx(2 * 12 / 32)
    assert hd == pytest.approx(2.0), "a one-column shift along the 2 mm axis is 2 mm"
    dice, hd = dice_hd95(prediction, reference, spacing=(2.0, 0.5, 10.0))
    assert hd == pytest.approx(0.5)

    stacked = np.zeros_like(reference)
    stacked[2:6, 2:6, 2] = True  # the next slice, 10 mm away
    assert dice_hd95(stacked, reference, (1.0, 1.0, 10.0)) == (0.0, pytest.approx(10.0))

    empty = np.zeros_like(reference)
    assert dice_hd95(empty, reference, (1.0, 1.0, 1.0))[0] == 0.0
    assert math.isnan(dice_hd95(empty, reference, (1.0, 1.0, 1.0))[1]), "a miss has no distance, never 0"
    assert math.isnan(dice_hd95(reference, empty, (1.0, 1.0, 1.0))[1])
    assert all(math.isnan(v) for v in dice_hd95(empty, empty, (1.0, 1.0, 1.0)))


def test_structures_and_summary_rules():
    reference = np.zeros((8, 8, 1), np.uint8)
    reference[1:7, 1:7] = 1
    reference[2:4, 2:4] = 2
    reference[4:6, 4:6] = 3
    prediction = reference.copy()
    prediction[prediction == 3] = 2  # edema called scar
    metrics = case_metrics(prediction, reference, (1.0, 1.0, 1.0))
    assert metrics["myocardium"][0] == 1.0 and metrics["whole_myocardium"][0] == 1.0
    assert metrics["scar_edema"][0] == 1.0 and metrics["scar"][0] == pytest.approx(2 * 4 / 12)
    assert metrics["edema"][0] == 0.0 and math.isnan(metrics["edema"][1])
    summary = summarise([metrics, case_metrics(reference, reference, (1.0, 1.0, 1.0))])
    assert summary["edema"]["dice"] == pytest.approx(0.5) and summary["edema"]["hd95"] == 0.0
    assert summary["edema"]["n"] == 2 and summary["edema"]["n_undefined_hd95"] == 1


def test_baseline_trains_and_tests(workspace):
    run = workspace / "single"
    assert train_script.main(train_args(workspace, "single", *ONE_EPOCH, "--model", "transunet_single",
                                        "--modality", "T2w")) == 0
    spec = load_checkpoint(run / "last.pth")["spec"]
    assert spec["model"] == "transunet_single" and spec["modality"] == "T2w"
    assert test_script.main(["--output_dir", str(run), "--no_save_nii"]) == 0
    assert (run / "test_test_vol_best" / "summary.json").is_file()
    assert not list((run / "test_test_vol_best").glob("*.nii.gz"))
