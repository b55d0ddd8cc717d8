"""--postprocess (the largest connected myocardium) in test.py and predict.py, and predict.py's ensemble of runs."""
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import predict
from engine import predictor
import test as test_script
from engine import evaluation, prediction
from conftest import train_tiny_run, write_phantom_training_data
from datasets.dataset_myops import MyoPSDataset
from datasets.geometry import probabilities_to_original
from datasets.layouts import find_cases, load_case
from datasets.postprocessing import keep_largest_myocardium
from datasets.preprocessing import preprocess_case
from networks.inference import HeadAverage, predict_volume
from engine.checkpoints import inference_model, load_checkpoint


def test_the_largest_whole_myocardium_is_kept_and_everything_outside_it_removed():
    labels = np.zeros((20, 20, 3), np.uint8)
    labels[4:8, 4:8, 0:3] = 1  # the main wall: 48 voxels of normal myocardium ...
    labels[5:7, 5:7, 1] = 2  # ... with scar inside it
    labels[8:10, 4:8, 0:2] = 3  # ... and edema touching it face to face: 16 voxels
    labels[10, 8, 2] = 2  # scar touching the edema by a corner only (26-connectivity)
    labels[14:18, 14:18, 0:3] = 1  # a stray blob of 48 voxels: more than the wall's 44 of normal myocardium
    labels[0, 15:19, 1] = 2  # scar away from the wall
    labels[19, 0, 0] = 3  # a lone edema voxel
    main = np.zeros_like(labels)
    main[4:11, 4:9] = labels[4:11, 4:9]
    kept = keep_largest_myocardium(labels)
    np.testing.assert_array_equal(kept, main)
    assert kept.dtype == labels.dtype and labels[14, 14, 0] == 1, "the input is left as it was"
    np.testing.assert_array_equal(keep_largest_myocardium(main), main)


def test_an_empty_volume_stays_empty():
    empty = np.zeros((6, 5, 2), np.uint8)
    kept = keep_largest_myocardium(empty)
    assert kept.shape == empty.shape and not kept.any()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the testing configuration (other seeds) trained for an epoch on the same 3 phantom cases,
    their training data (1 test case), and 2 cases without labels."""
    root = tmp_path_factory.mktemp("ensemble")
    priors = write_phantom_training_data(root, cases=4, seed=5)
    for name, seed in (("a", "1"), ("b", "2")):
        assert train_tiny_run(root / "data", priors, root / name, "--max_epochs", "1", "--seed", seed) == 0
    for sequence in ("bSSFP", "LGE", "T2w"):
        (root / "unlabelled" / "Raw_data" / sequence).mkdir(parents=True)
        for path in sorted((root / "raw" / "Raw_data" / sequence).iterdir())[2:]:
            shutil.copy(path, root / "unlabelled" / "Raw_data" / sequence)
    return root


def spy_on_postprocessing(monkeypatch, module):
    """The shapes of the volumes that ``module`` post-processes (the real function still does the work).

    A model trained for one epoch predicts one connected blob, so nothing is removed from its predictions: the
    spy shows which volumes pass through the post-processing, the hand-made volumes above what it removes."""
    shapes = []

    def spy(labels):
        shapes.append(labels.shape)
        return keep_largest_myocardium(labels)

    monkeypatch.setattr(module, "keep_largest_myocardium", spy)
    return shapes


def run_test_script(runs, out, *extra):
    return test_script.main(["--output_dir", str(runs / "a"), "--checkpoint", "last", "--test_save_dir", str(out),
                             "--device", "cpu", "--protocol", "released", *extra])


def test_test_py_postprocesses_its_predictions_and_records_it_with_tta(runs, monkeypatch):
    plain, processed = runs / "test_plain", runs / "test_postprocessed"
    shapes = spy_on_postprocessing(monkeypatch, evaluation)
    assert run_test_script(runs, plain, "--tta") == 0
    assert shapes == [], "off by default"
    assert run_test_script(runs, processed, "--tta", "--postprocess") == 0
    held_out, = json.loads((runs / "data" / "dataset.json").read_text())["split"]["test"]
    raw = np.asarray(nib.load(str(plain / f"{held_out}_pred.nii.gz")).dataobj)
    assert sorted(shapes) == sorted([raw.shape, (64, 64, raw.shape[2])]), "the original and the processed grid"
    kept = np.asarray(nib.load(str(processed / f"{held_out}_pred.nii.gz")).dataobj)
    assert raw.any(), "the trained model finds some myocardium"
    np.testing.assert_array_equal(kept, keep_largest_myocardium(raw))
    for out, postprocess in ((plain, False), (processed, True)):
        info = json.loads((out / "test_info.json").read_text())
        assert (info["tta"], info["postprocess"]) == (True, postprocess)
        summary = json.loads((out / "summary.json").read_text())
        assert {(entry["tta"], entry["postprocess"]) for entry in summary.values()} == {(True, postprocess)}
        released = json.loads((out / "summary_released_protocol.json").read_text())
        assert (released["tta"], released["postprocess"]) == (True, postprocess)
    rows = list(csv.DictReader(open(processed / "metrics.csv")))
    whole = next(row for row in rows if row["structure"] == "whole_myocardium")
    reference = np.asarray(nib.load(str(runs / "raw" / "Raw_data" / "label" / f"{held_out}_gt.nii.gz")).dataobj) > 0
    prediction = kept > 0
    assert whole["space"] == "original"
    assert float(whole["dice"]) == pytest.approx(2 * (prediction & reference).sum() / (prediction.sum()
                                                                                         + reference.sum()))


def test_test_py_scores_the_averaged_probabilities_of_an_ensemble(runs, caplog):
    out = runs / "test_ensemble"
    assert run_test_script(runs, out, "--ensemble", str(runs / "b")) == 0
    info = json.loads((out / "test_info.json").read_text())
    assert info["ensemble"] == [str(runs / name / "last.pth") for name in ("a", "b")]
    models = [inference_model(load_checkpoint(runs / name / "last.pth"), name, "cpu") for name in ("a", "b")]
    volume = MyoPSDataset(runs / "data", runs / "data", "test_vol")[0]
    probabilities = [predict_volume(model, volume["image"], 64) for model in models]
    averaged, first = (probabilities_to_original(p.numpy(), volume["geometry"])
                       for p in (torch.stack(probabilities).mean(dim=0), probabilities[0]))
    assert not np.array_equal(averaged, first), "the runs disagree, so the ensemble is not the first run alone"
    written = np.asarray(nib.load(str(out / f"{volume['case_name']}_pred.nii.gz")).dataobj)
    np.testing.assert_array_equal(written, averaged)

    assert test_script.main(["--output_dir", str(runs / "a"), "--checkpoint", "last", "--device", "cpu", "--no_save_nii",
                             "--ensemble", str(runs / "b")]) == 0
    default = json.loads((runs / "a" / "test_test_vol_last_ensemble2" / "test_info.json").read_text())
    assert default["ensemble"] == info["ensemble"], "an ensemble's default folder is not the run's own"

    refused = runs / "test_ensemble_twice"
    assert run_test_script(runs, refused, "--ensemble", str(runs / "a")) == 1
    assert "would enter the ensemble more than once" in caplog.text and not refused.exists()


def test_test_py_averages_the_heads_it_is_given_and_refuses_them_for_a_baseline(runs, caplog):
    out = runs / "test_heads"
    assert run_test_script(runs, out, "--heads", "fused,LGE") == 0
    assert json.loads((out / "test_info.json").read_text())["heads"] == ["fused", "LGE"]
    model = inference_model(load_checkpoint(runs / "a" / "last.pth"), "a", "cpu")
    volume = MyoPSDataset(runs / "data", runs / "data", "test_vol")[0]
    expected = probabilities_to_original(predict_volume(HeadAverage(model, ("fused", "LGE")), volume["image"], 64)
                                         .numpy(), volume["geometry"])
    written = np.asarray(nib.load(str(out / f"{volume['case_name']}_pred.nii.gz")).dataobj)
    np.testing.assert_array_equal(written, expected)

    with pytest.raises(SystemExit):
        run_test_script(runs, runs / "test_heads_unknown", "--heads", "fused,scar")
    with pytest.raises(SystemExit):
        run_test_script(runs, runs / "test_heads_twice", "--heads", "LGE,LGE")
    baseline = runs / "early"
    assert train_tiny_run(runs / "data", runs / "priors.pt", baseline, "--max_epochs", "1", "--model",
                          "transunet_early") == 0
    refused = runs / "test_heads_baseline"
    assert test_script.main(["--output_dir", str(baseline), "--checkpoint", "last", "--test_save_dir", str(refused),
                             "--device", "cpu", "--heads", "fused,LGE"]) == 1
    assert "transunet_early checkpoint has one head" in caplog.text and not refused.exists()


def labels_of_runs(runs, names, tta):
    """{case: (labels of the runs' probabilities averaged, labels of the first run alone)}, computed case by case
    with the project's functions."""
    checkpoints = [load_checkpoint(runs / name / "last.pth") for name in names]
    models = [inference_model(checkpoint, name, "cpu") for checkpoint, name in zip(checkpoints, names)]
    modalities, settings = predictor.run_preprocessing(checkpoints[0], names[0])
    labels = {}
    for case in find_cases(runs / "unlabelled", labelled=False):
        prepared = preprocess_case(load_case(case), settings)
        image = torch.from_numpy(np.stack([prepared.images[m] for m in modalities]))
        probabilities = [predict_volume(model, image, 64, tta=tta) for model in models]
        labels[case.case_id] = (probabilities_to_original(torch.stack(probabilities).mean(dim=0).numpy(),
                                                          prepared.geometry),
                                probabilities_to_original(probabilities[0].numpy(), prepared.geometry))
    return labels


def run_predict(runs, out, names, *extra):
    return predict.main(["--input_dir", str(runs / "unlabelled"), "--output_dir", str(out), "--run",
                         *[str(runs / name) for name in names], "--checkpoint", "last", "--device", "cpu", *extra])


def test_an_ensemble_writes_the_argmax_of_the_averaged_probabilities(runs, monkeypatch):
    with_tta = labels_of_runs(runs, ["a", "b"], tta=True)
    assert any(not np.array_equal(averaged, first) for averaged, first in with_tta.values()), \
        "the two runs disagree somewhere, so that the ensemble is not the first run alone"
    out = runs / "ensemble"
    assert run_predict(runs, out, ["a", "b"], "--tta") == 0
    for case, (averaged, _) in with_tta.items():
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / f"{case}.nii.gz")).dataobj), averaged)
    rows = list(csv.DictReader(open(out / "volumes.csv")))
    assert {row["checkpoint"] for row in rows} == {f"{runs / 'a' / 'last.pth'};{runs / 'b' / 'last.pth'}"}

    postprocessed = runs / "ensemble_postprocessed"
    shapes = spy_on_postprocessing(monkeypatch, prediction)
    assert run_predict(runs, postprocessed, ["a", "b"], "--postprocess", "--save_png") == 0
    without_tta = labels_of_runs(runs, ["a", "b"], tta=False)
    assert sorted(shapes) == sorted([averaged.shape for averaged, _ in without_tta.values()]
                                    + [(64, 64, averaged.shape[2]) for averaged, _ in without_tta.values()])
    for case, (averaged, _) in without_tta.items():
        written = np.asarray(nib.load(str(postprocessed / f"{case}.nii.gz")).dataobj)
        np.testing.assert_array_equal(written, keep_largest_myocardium(averaged))


@pytest.mark.parametrize("field, value", [("crop_size", 48), ("crop_centre", "heart")])
def test_an_ensemble_of_differently_preprocessed_runs_is_refused_with_the_names(runs, tmp_path, caplog, field,
                                                                                value):
    checkpoint = load_checkpoint(runs / "b" / "last.pth")
    checkpoint["preprocessing"]["settings"][field] = value
    (tmp_path / "other").mkdir()
    torch.save(checkpoint, tmp_path / "other" / "last.pth")
    code = predict.main(["--input_dir", str(runs / "unlabelled"), "--output_dir", str(tmp_path / "out"), "--run",
                         str(runs / "a"), str(tmp_path / "other"), "--checkpoint", "last", "--device", "cpu"])
    assert code == 1
    assert f"the runs {runs / 'a'} and {tmp_path / 'other'} cannot be averaged" in caplog.text
    _, settings = predictor.run_preprocessing(load_checkpoint(runs / "a" / "last.pth"), "a")
    original = getattr(settings, field)
    assert (f"{field} {original!r} in {runs / 'a' / 'last.pth'}, {value!r} in {tmp_path / 'other' / 'last.pth'}"
            in caplog.text)
    assert not (tmp_path / "out").exists()


def test_the_same_checkpoint_twice_is_refused(runs, tmp_path, caplog):
    assert run_predict(runs, tmp_path / "out", ["a", "a"]) == 1
    assert "would enter the ensemble more than once" in caplog.text and not (tmp_path / "out").exists()


def test_an_ensemble_of_heart_centred_runs_shares_one_locator(runs, tmp_path):
    """Members relabelled as trained on heart crops; the locator is run a (image-centred), one for all."""
    heart_runs = []
    for name in ("a", "b"):
        checkpoint = load_checkpoint(runs / name / "last.pth")
        checkpoint["preprocessing"]["settings"]["crop_centre"] = "heart"
        (tmp_path / name).mkdir()
        torch.save(checkpoint, tmp_path / name / "last.pth")
        heart_runs.append(str(tmp_path / name))
    out = tmp_path / "out"
    assert predict.main(["--input_dir", str(runs / "unlabelled"), "--output_dir", str(out), "--run", *heart_runs,
                         "--checkpoint", "last", "--device", "cpu", "--locator_run", str(runs / "a")]) == 0
    locator = predictor.HeartLocator(runs / "a", "last", "cpu")
    members = predictor.load_ensemble([tmp_path / "a", tmp_path / "b"], "last", "cpu")
    for case in find_cases(runs / "unlabelled", labelled=False):
        volumes = load_case(case)
        prepared = preprocess_case(volumes, members[0].settings, locator(volumes))
        image = torch.from_numpy(np.stack([prepared.images[m] for m in members[0].modalities]))
        probabilities = torch.stack([predict_volume(member.model, image, 64) for member in members]).mean(dim=0)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / f"{case.case_id}.nii.gz")).dataobj),
                                      probabilities_to_original(probabilities.numpy(), prepared.geometry))
