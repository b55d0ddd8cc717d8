"""The subset stage (train.py --subsets_from, documentation/missing_sequences.md): the complete run frozen and
untouched, new parameters for the proper subsets trained beside it, one checkpoint routed by what a case has."""
import copy
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import predict
import preprocess_data
import test as test_script
import train as train_script
from conftest import ROOT, make_batch, make_model, train_tiny_run, write_phantom_training_data
from engine.checkpoints import inference_model, load_checkpoint, model_from_spec, serves_subsets
from engine.subset_limits import NOT_MEASURABLE, not_measurable
from engine.subset_stage import file_sha256
from networks.inference import fuse_for_inference
from networks.missing_sequences import draw_subset_views, present_mask, proper_subsets
from networks.subset_stage import SubsetIMMSeg, adapter_parameters_per_subset, complete_weights
from utils import SubsetStageLoss

STAGE_FLAGS = ["--num_workers", "0", "--progress", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-epoch complete run of the testing configuration on 3 phantom cases, and a one-epoch subset stage on it
    trained on the same cases preprocessed alike with a validation case."""
    root = tmp_path_factory.mktemp("stage")
    priors = write_phantom_training_data(root, cases=6, seed=31)
    assert train_tiny_run(root / "data", priors, root / "complete", "--max_epochs", "1") == 0
    assert preprocess_data.main(["--dataset", "Phantom", "--src_path", str(root / "training_raw"), "--dst_path",
                                 str(root / "data_val"), "--spacing", "2.0", "--crop_size", "64", "--test_every", "3",
                                 "--val_fraction", "0.5"]) == 0
    assert train_script.main(["--subsets_from", str(root / "complete"), "--root_path", str(root / "data_val"),
                              "--max_epochs", "1", "--val_every", "1", *STAGE_FLAGS]) == 0
    return root


def stage_checkpoint(runs, name="last.pth"):
    return load_checkpoint(runs / "complete_subsets" / name, map_location="cpu")


def models(runs):
    """(complete model, stage model) of the runs' last checkpoints, in eval mode."""
    loaded = []
    for path in (runs / "complete" / "last.pth", runs / "complete_subsets" / "last.pth"):
        checkpoint = load_checkpoint(path, map_location="cpu")
        model = model_from_spec(checkpoint["spec"], checkpoint["model"])
        model.load_state_dict(checkpoint["model"])
        loaded.append(model.eval())
    return loaded


# complete cases: the complete run's outputs, bit for bit ----------------------------------------------------------

def test_the_stage_holds_the_complete_weights_bit_for_bit_and_records_the_run(runs):
    complete = load_checkpoint(runs / "complete" / "last.pth")
    stage = stage_checkpoint(runs)
    kept = complete_weights(stage["model"])
    assert sorted(kept) == sorted(complete["model"]), "every parameter and buffer, none added"
    changed = [name for name, value in complete["model"].items() if not torch.equal(kept[name], value)]
    assert changed == [], "training the stage changed no tensor of the complete model (BatchNorm statistics included)"
    adapters = {name: value for name, value in stage["model"].items() if name.startswith("adapters.")}
    assert adapters and any(value.abs().sum() > 0 for value in adapters.values()), "the subset parameters trained"
    assert all(torch.isfinite(value).all() for value in adapters.values())
    assert set(stage["model"]) == set(adapters) | {f"complete.{name}" for name in kept}
    record = stage["complete_run"]
    assert record["sha256"] == file_sha256(runs / "complete" / "last.pth")
    assert record["checkpoint"] == str((runs / "complete" / "last.pth").resolve())
    assert record["spec"] == complete["spec"]
    assert stage["spec"]["subset_stage"]["complete_sha256"] == record["sha256"]
    config = json.loads((runs / "complete_subsets" / "config.json").read_text())
    assert config["complete_run"]["sha256"] == record["sha256"] and serves_subsets(config)
    assert (config["args"]["vit_name"], config["args"]["batch_size"]) == ("testing", 4), "taken from the run"
    assert serves_subsets(stage) and not serves_subsets(complete)
    assert stage["train_state"]["best_epoch"] == 1, "validated on the subsets"


def test_complete_inputs_give_the_complete_runs_logits_bit_for_bit(runs):
    complete, stage = models(runs)
    images, _ = make_batch(3, seed=7)
    every = torch.ones(3, 3, dtype=torch.bool)
    mixed = torch.tensor([[True, True, True], [True, True, False], [False, False, True]])
    with torch.no_grad():
        expected = complete(images)
        assert torch.equal(stage(images), expected)
        assert torch.equal(stage(images, present=every), expected)
        assert torch.equal(stage(images, present=mixed)[0], expected[0]), "a complete row of a mixed batch"
        assert not torch.equal(stage(images, present=mixed)[1], expected[1])
        assert torch.equal(stage.head_logits(images)["LGE"], complete.head_logits(images)["LGE"])
    complete_copy = inference_model(load_checkpoint(runs / "complete" / "last.pth"), "complete", "cpu")
    stage_copy = inference_model(stage_checkpoint(runs), "stage", "cpu")
    channels_last = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(stage_copy(channels_last), complete_copy(channels_last))
        subset = present_mask(("bSSFP", "LGE"), 3)
        torch.testing.assert_close(stage_copy(channels_last, present=subset), stage(images, present=subset),
                                   rtol=1e-4, atol=1e-4)


# the subset path ---------------------------------------------------------------------------------------------------

def test_a_missing_sequence_never_reaches_the_subset_path(tiny_config):
    stage = SubsetIMMSeg(make_model(tiny_config)).eval()
    with torch.no_grad():
        for parameter in stage.adapters.parameters():
            parameter.normal_(std=0.1)  # not the identity: every addition acts
    images, _ = make_batch(2, seed=3)
    other = images.clone()
    other[:, 2] = float("nan")
    present = present_mask(("bSSFP", "LGE"), 2)
    with torch.no_grad():
        logits = stage(images, present=present)
        assert torch.isfinite(logits).all() and torch.equal(stage(other, present=present), logits)
        assert not torch.equal(logits, stage(images, present=present_mask(("LGE", "T2w"), 2)))


def test_training_the_stage_moves_the_subset_parameters_alone(tiny_config):
    complete = make_model(tiny_config).train()
    complete(make_batch(2, seed=1)[0])  # BatchNorm statistics other than the initial ones
    stage = SubsetIMMSeg(complete).train()
    before = copy.deepcopy(stage.complete.state_dict())
    adapters_before = copy.deepcopy(stage.adapters.state_dict())
    assert not stage.complete.training and not any(p.requires_grad for p in stage.complete.parameters())
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=0.01)
    criterion = SubsetStageLoss(4, soft_target_weight=0.5)
    torch.manual_seed(0)
    for step in range(2):
        images, labels = make_batch(3, seed=step)
        loss, terms = criterion(stage(images, subset_view=draw_subset_views(3, proper_subsets())), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and set(terms) == {"subset_fused", "soft_targets"}
    after = stage.complete.state_dict()
    assert [name for name, value in before.items() if not torch.equal(after[name], value)] == []
    moved = [name for name, value in stage.adapters.state_dict().items()
             if not torch.equal(value, adapters_before[name])]
    assert len(moved) == len(adapters_before), "every subset parameter trained"
    per_subset, total = adapter_parameters_per_subset(stage)
    assert 0 < per_subset < 0.01 * total


def test_the_soft_targets_are_the_complete_views_probabilities(tiny_config):
    stage = SubsetIMMSeg(make_model(tiny_config)).train()
    images, labels = make_batch(2, seed=5)
    output = stage(images, subset_view=present_mask(("T2w",), 2))
    with torch.no_grad():
        assert torch.equal(output.complete_logits, stage.complete(images)), "the untouched complete model's logits"
    _, with_targets = SubsetStageLoss(4, 1.0)(output, labels)
    _, labels_only = SubsetStageLoss(4, 0.0)(output, labels)
    assert with_targets["soft_targets"] > 0 and "soft_targets" not in labels_only
    same = output._replace(complete_logits=output.fused_logits.detach())
    assert SubsetStageLoss(4, 1.0)(same, labels)[1]["soft_targets"].abs() < 1e-6, "no divergence from itself"


def test_the_stage_runs_on_the_device_of_its_inputs(tiny_config):
    """Nothing is created on another device: the stage moved to the meta device trains and predicts there."""
    stage = SubsetIMMSeg(make_model(tiny_config)).to("meta").train()
    images = torch.zeros(2, 3, 64, 64, device="meta")
    output = stage(images, subset_view=draw_subset_views(2, proper_subsets(device="meta")))
    loss, _ = SubsetStageLoss(4, 0.5).to("meta")(output, torch.zeros(2, 64, 64, dtype=torch.long, device="meta"))
    loss.backward()
    assert {p.grad.device.type for p in stage.adapters.parameters()} == {"meta"}
    fused = fuse_for_inference(stage)
    assert {t.device.type for t in list(fused.parameters()) + list(fused.buffers())} == {"meta"}
    subset = present_mask(("LGE",), 2, device="meta")
    assert fused.subset_logits(images, subset).device.type == "meta"
    assert fused(images).device.type == "meta"


# the scripts -------------------------------------------------------------------------------------------------------

def score(run, out, *extra):
    return test_script.main(["--output_dir", str(run), "--checkpoint", "last", "--test_save_dir", str(out),
                             "--no_save_nii", "--device", "cpu", *extra])


def test_test_py_scores_complete_cases_as_the_complete_run_and_any_subset(runs, caplog):
    assert score(runs / "complete", runs / "scored_complete") == 0
    assert score(runs / "complete_subsets", runs / "scored_stage") == 0
    rows = [list(csv.DictReader(open(runs / folder / "metrics.csv"))) for folder in ("scored_complete", "scored_stage")]
    assert rows[0] == rows[1], "complete cases: the complete run's figures"
    caplog.clear()
    assert score(runs / "complete_subsets", runs / "scored_subset", "--sequences", "bSSFP,LGE") == 0
    info = json.loads((runs / "scored_subset" / "test_info.json").read_text())
    assert info["sequences"] == ["bSSFP", "LGE"] and list(info["not_measurable"]) == ["edema"]
    assert "Edema *" in caplog.text and "* edema not measurable from bSSFP+LGE" in caplog.text
    assert score(runs / "complete_subsets", runs / "heads", "--sequences", "bSSFP,LGE", "--heads", "fused,LGE") == 1
    assert "serves the fused head alone" in caplog.text


def test_predict_py_routes_each_case_by_the_sequences_it_has(runs, caplog):
    src = runs / "unlabelled"
    for sequence in ("bSSFP", "LGE", "T2w"):
        (src / "Raw_data" / sequence).mkdir(parents=True)
        for case in ("case0004", "case0005"):
            shutil.copy(runs / "raw" / "Raw_data" / sequence / f"{case}.nii.gz", src / "Raw_data" / sequence)
    (src / "Raw_data" / "T2w" / "case0005.nii.gz").unlink()
    out = {}
    for run in ("complete", "complete_subsets"):
        out[run] = runs / f"predicted_{run}"
        code = predict.main(["--input_dir", str(src), "--output_dir", str(out[run]), "--run", str(runs / run),
                             "--checkpoint", "last", "--device", "cpu"])
        assert code == (1 if run == "complete" else 0), "the complete run alone cannot predict without T2w"
    labels = [np.asarray(nib.load(str(out[run] / "case0004.nii.gz")).dataobj) for run in out]
    np.testing.assert_array_equal(labels[0], labels[1])
    rows = {row["case"]: row for row in csv.DictReader(open(out["complete_subsets"] / "volumes.csv"))}
    assert rows["case0005"]["sequences"] == "bSSFP;LGE" and rows["case0005"]["error"] == ""
    assert rows["case0005"]["edema_ml"] == rows["case0005"]["edema_percent"] == ""
    assert rows["case0005"]["scar_ml"] != "" and rows["case0005"]["not_measurable"].startswith("edema not measurable")
    assert rows["case0004"]["not_measurable"] == "" and rows["case0004"]["edema_ml"] != ""
    assert "case0005: no edema volume: edema not measurable from bSSFP+LGE" in caplog.text


def test_the_table_of_what_a_subset_cannot_measure():
    assert not_measurable(("bSSFP", "LGE", "T2w")) == {} and not_measurable(("T2w", "LGE")) == {}
    assert list(not_measurable(("LGE", "bSSFP"))) == ["edema"], "any order of the names"
    assert list(not_measurable(("bSSFP",))) == ["scar", "edema"]
    for subset, structures in NOT_MEASURABLE.items():
        missing = {"scar": "LGE", "edema": "T2w"}
        assert all(missing[structure] not in subset for structure in structures), "only where its sequence is missing"
        assert all(0 <= dice < 30 for dice in structures.values())


# refusals and resume -----------------------------------------------------------------------------------------------

def test_a_baseline_run_a_stage_and_contradicting_flags_are_refused(runs, capsys):
    baseline = runs / "early"
    assert train_tiny_run(runs / "data", runs / "priors.pt", baseline, "--max_epochs", "1", "--model",
                          "transunet_early") == 0
    for source, message in ((baseline, "is a transunet_early run; the subset stage adds to an I-MMSeg run"),
                            (runs / "complete_subsets", "is a subset stage already")):
        with pytest.raises(SystemExit):
            train_script.main(["--subsets_from", str(source), *STAGE_FLAGS])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_script.main(["--subsets_from", str(runs / "complete"), "--vit_name", "compact", "--img_size", "64",
                           "--contrast_w", "0.2", "--output_dir", str(runs / "refused"), *STAGE_FLAGS])
    error, = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--vit_name compact (the complete run" in error and "has testing)" in error
    assert "--contrast_w (the stage keeps" in error and "--img_size" not in error, "the same value is fine"
    with pytest.raises(SystemExit):
        train_script.main(["--soft_target_weight", "1", "--output_dir", str(runs / "refused"), *STAGE_FLAGS])
    assert "--soft_target_weight goes with --subsets_from" in capsys.readouterr().err
    assert not (runs / "refused").exists() and not (runs / "early_subsets").exists()


def test_the_stage_resumes_like_any_run(runs, caplog):
    run = runs / "resumed"
    flags = ["--subsets_from", str(runs / "complete" / "last.pth"), "--output_dir", str(run), *STAGE_FLAGS]
    assert train_script.main([*flags, "--max_epochs", "1"]) == 0
    first = load_checkpoint(run / "last.pth")
    assert train_script.main([*flags, "--max_epochs", "2"]) == 1, "a folder with checkpoints needs --resume"
    assert train_script.main([*flags, "--max_epochs", "2", "--resume", "auto"]) == 0
    assert "resumed from" in caplog.text
    second = load_checkpoint(run / "last.pth")
    assert second["train_state"]["iteration"] == 2 * first["train_state"]["iteration"]
    complete = load_checkpoint(runs / "complete" / "last.pth")["model"]
    assert all(torch.equal(value, complete[name]) for name, value in complete_weights(second["model"]).items())
    assert json.loads((run / "config.json").read_text())["args"]["soft_target_weight"] == 0.5


def test_the_table_is_the_rule_applied_to_the_committed_measurement():
    """engine/subset_limits.py's figures are those of subsets_stage_300.md's column (a), and its cells exactly the
    structures below 30 % from a subset that lacks the sequence showing them."""
    from engine.subset_limits import COMPLETE_DICE

    table = ROOT / "benchmarks" / "results" / "missing_sequences" / "subsets_stage_300.md"
    names = {"scar": "scar", "edema": "edema"}
    measured = {}
    for line in table.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) > 4 and cells[1] in names:
            measured[(tuple(cells[0].split(",")), cells[1])] = float(cells[4])
    shows = {"scar": "LGE", "edema": "T2w"}
    expected = {}
    for (subset, structure), dice in measured.items():
        if len(subset) == 3:
            assert COMPLETE_DICE[structure] == dice
        elif shows[structure] not in subset and dice < 30:
            expected.setdefault(subset, {})[structure] = dice
    assert expected == NOT_MEASURABLE
