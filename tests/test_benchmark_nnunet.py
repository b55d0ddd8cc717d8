"""benchmarks/nnunet_myops2020.py on a small phantom, without nnU-Net: its input folders, our folds as its split, the
budget's arithmetic, the predictions mapped back to the original space and the records the report reads."""
import json
import math
import random

import h5py
import nibabel as nib
import numpy as np
import pytest

from benchmarks.harness import prepare, records as result_files, report
from benchmarks import nnunet_myops2020 as nnunet
from benchmarks.nnunet_trainer import nnunet_budget
from datasets.geometry import CaseGeometry, probabilities_to_original
from datasets.layouts import find_myops380_cases, load_case
from datasets.vocabulary import LABEL_MAPS, MODALITIES
from conftest import prepare_benchmark_phantom


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_benchmark_phantom(tmp_path_factory.mktemp("nnunet"))


def fold_input(prepared, fold):
    return prepare.read_input(prepared / "data", fold)


def nifti(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image


def test_raw_input_holds_every_case_in_the_project_channel_order(prepared):
    setting, fold_dir, dataset = fold_input(prepared, 0)
    root = nnunet.nnunet_root(prepared / "out", "data", "nnunet_own", 0)
    assert root == nnunet.nnunet_root(prepared / "out", "data", "nnunet_own", 2), "one nnU-Net folder for all folds"
    folder = nnunet.prepare_raw_folder("nnunet_own", setting, fold_dir, dataset, root)
    description = json.loads((folder / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "bSSFP", "1": "LGE", "2": "T2w"}
    assert description["labels"] == {"background": 0, "myocardium": 1, "scar": 2, "edema": 3}
    assert (description["numTraining"], description["file_ending"]) == (6, ".nii.gz")
    cases = find_myops380_cases(prepared / "raw")
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c.case_id}.nii.gz" for c in cases]
    assert len(list((folder / "imagesTr").iterdir())) == 18
    for case in cases[:2]:
        volumes = load_case(case, LABEL_MAPS["MyoPS380"])
        for index, modality in enumerate(MODALITIES):
            data, image = nifti(folder / "imagesTr" / f"{case.case_id}_{index:04d}.nii.gz")
            np.testing.assert_array_equal(data, volumes.images[modality])
            np.testing.assert_allclose(image.affine, volumes.affine)
        label, _ = nifti(folder / "labelsTr" / f"{case.case_id}.nii.gz")
        np.testing.assert_array_equal(label, volumes.label)


def test_raw_input_maps_myops2020_label_codes(prepared, tmp_path):
    """A case in the MyoPS 2020 per-case layout: codes 200, 2221, 1220 become 1, 2, 3; blood pools background."""
    source = load_case(find_myops380_cases(prepared / "raw")[0], LABEL_MAPS["MyoPS380"])
    case_dir = tmp_path / "src" / "Case1001"
    case_dir.mkdir(parents=True)
    for modality, suffix in zip(MODALITIES, ("C0", "LGE", "T2")):
        nib.save(nib.Nifti1Image(source.images[modality], source.affine), str(case_dir / f"Case1001_{suffix}.nii.gz"))
    codes = np.array([0, 200, 2221, 1220], dtype=np.int16)[source.label]
    codes[:3, :3] = 500
    nib.save(nib.Nifti1Image(codes, source.affine), str(case_dir / "Case1001_gd.nii.gz"))
    setting = {"dataset": "MyoPS2020", "source": str(tmp_path / "src"), "folds": [["Case1001"]]}
    assert nnunet.write_raw_dataset(setting, _input_folder(tmp_path / "nnunet")) == 1
    label, _ = nifti(tmp_path / "nnunet" / "labelsTr" / "Case1001.nii.gz")
    expected = source.label.copy()
    expected[:3, :3] = 0
    np.testing.assert_array_equal(label, expected)
    lge, _ = nifti(tmp_path / "nnunet" / "imagesTr" / "Case1001_0001.nii.gz")
    np.testing.assert_array_equal(lge, source.images["LGE"])


def _input_folder(folder):
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    return folder


def test_processed_input_is_our_preprocessed_fold_at_its_spacing(prepared):
    setting, fold_dir, dataset = fold_input(prepared, 1)
    root = nnunet.nnunet_root(prepared / "out", "data", "nnunet_ours", 1)
    folder = nnunet.prepare_raw_folder("nnunet_ours", setting, fold_dir, dataset, root)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 6
    train_case, test_case = dataset["split"]["train"][0], dataset["split"]["test"][0]
    slices = sorted(name for name in (fold_dir / "train.txt").read_text().split() if name.startswith(train_case))
    for index, modality in enumerate(MODALITIES):
        data, image = nifti(folder / "imagesTr" / f"{train_case}_{index:04d}.nii.gz")
        assert data.shape == (64, 64, len(slices))
        for z, name in enumerate(slices):
            stored = np.load(fold_dir / modality / "train_npz" / f"{name}.npz")["image"]
            np.testing.assert_array_equal(data[..., z], stored)
        with h5py.File(fold_dir / modality / "test_vol_h5" / f"{test_case}.npy.h5", "r") as handle:
            volume, geometry = handle["image"][:], CaseGeometry.from_attrs(handle.attrs)
        data, image = nifti(folder / "imagesTr" / f"{test_case}_{index:04d}.nii.gz")
        np.testing.assert_array_equal(data, volume)
        np.testing.assert_allclose(image.header.get_zooms(), geometry.processed_spacing, rtol=1e-6)
    raw = nib.load(str(find_myops380_cases(prepared / "raw")[0].images["bSSFP"]))
    zooms = nib.load(str(folder / "imagesTr" / f"{train_case}_0000.nii.gz")).header.get_zooms()
    assert zooms[0] == pytest.approx(2.0, abs=0.1) and zooms[2] == pytest.approx(raw.header.get_zooms()[2])
    label, _ = nifti(folder / "labelsTr" / f"{train_case}.nii.gz")
    np.testing.assert_array_equal(label[..., 0], np.load(fold_dir / "LGE" / "train_npz" / f"{slices[0]}.npz")["label"])


def test_nnunet_split_is_our_folds(prepared):
    folds = json.loads((prepared / "split.json").read_text())["folds"]
    splits = nnunet.nnunet_splits(folds)
    every = sorted(sum(folds, []))
    assert len(splits) == 3
    for split, test in zip(splits, folds):
        assert split["val"] == sorted(test) and not set(split["train"]) & set(test)
        assert sorted(split["train"] + split["val"]) == every
    root = prepared / "splits_only"
    preprocessed = root / "preprocessed" / nnunet.DATASET
    (preprocessed / f"{nnunet.PLANS}_2d").mkdir(parents=True)
    (preprocessed / f"{nnunet.PLANS}.json").write_text("{}")  # planned already: no nnU-Net tool runs
    nnunet.plan_and_preprocess(None, root, {}, folds)
    assert json.loads((preprocessed / "splits_final.json").read_text()) == splits


def _seconds(iterations, seconds_per_iteration, seconds_per_epoch_end, iterations_per_epoch):
    return iterations * seconds_per_iteration + math.ceil(iterations / iterations_per_epoch) * seconds_per_epoch_end


def test_budget_becomes_iterations_and_reaches_the_trainer_through_the_environment():
    within = nnunet_budget.iterations_within_budget
    assert within(42 * 60, 1.0, 20.0, 250, 25) == 9 * 250 + 70, "9 epochs of 270 s, then 70 iterations and an end"
    assert within(42 * 60, 14.0, 700.0, 250, 25) == 130, "a budget under one epoch: one shortened epoch"
    assert within(60, 14.0, 700.0, 250, 25) == 25, "never fewer than the timed iterations"
    assert within(540, 1.0, 20.0, 250, 1) == 500 and within(539, 1.0, 20.0, 250, 1) == 499
    assert within(100, 1.0, 0.0, 250, 1) == 100
    with pytest.raises(ValueError, match="must be positive"):
        within(600, 0.0, 1.0, 250, 1)
    generator = random.Random(0)
    for _ in range(500):
        budget, per_iteration, end = generator.uniform(1, 5000), generator.uniform(0.05, 20), generator.uniform(0, 900)
        per_epoch, done = generator.randint(1, 300), generator.randint(1, 30)
        total = within(budget, per_iteration, end, per_epoch, done)
        assert total >= done
        assert total == done or _seconds(total, per_iteration, end, per_epoch) <= budget + 1e-6
        assert _seconds(total + 1, per_iteration, end, per_epoch) > budget - 1e-6
    assert nnunet_budget.budget_settings(nnunet_budget.budget_environment(42)) == (42.0, 25, (250, 50))
    assert nnunet_budget.budget_settings(nnunet_budget.budget_environment(0.5, 2, 25)) == (0.5, 2, (25, 5))
    assert nnunet_budget.budget_settings(nnunet_budget.budget_environment(1, 1, 3)) == (1.0, 1, (3, 1))
    with pytest.raises(ValueError, match="needs the environment variable"):
        nnunet_budget.budget_settings({})
    with pytest.raises(ValueError, match="must be positive"):
        nnunet_budget.budget_settings(nnunet_budget.budget_environment(1, 0))


def _one_hot(label, classes=4):
    return np.stack([(label == k).astype(np.float32) for k in range(classes)])


def _finished_nnunet_run(prepared, variant, fold, budget_minutes=1.0):
    """What nnUNetv2_plan_and_preprocess and nnUNetv2_train leave behind, the predictions being the labels."""
    setting, fold_dir, dataset = fold_input(prepared, fold)
    root = nnunet.nnunet_root(prepared / "out", "data", variant, fold)
    nnunet.prepare_raw_folder(variant, setting, fold_dir, dataset, root)
    preprocessed = root / "preprocessed" / nnunet.DATASET
    (preprocessed / f"{nnunet.PLANS}_2d").mkdir(parents=True, exist_ok=True)
    (preprocessed / f"{nnunet.PLANS}.json").write_text("{}")
    output = nnunet.fold_output(root, f"time {budget_minutes:g} min", fold)
    (output / "validation").mkdir(parents=True, exist_ok=True)
    (output / "checkpoint_final.pth").write_bytes(b"")
    expected = {}
    for case in dataset["split"]["test"]:
        label, image = nifti(root / "raw" / nnunet.DATASET / "labelsTr" / f"{case}.nii.gz")
        nib.save(image, str(output / "validation" / f"{case}.nii.gz"))  # nnU-Net's export keeps the input's grid
        if variant == "nnunet_ours":
            probabilities = _one_hot(label)
            np.savez_compressed(output / "validation" / f"{case}.npz",
                                probabilities=probabilities.transpose(0, 3, 2, 1))  # nnU-Net's (K, Z, Y, X)
            _, _, geometry = nnunet.read_processed_case(fold_dir, case, "test")
            expected[case] = probabilities_to_original(probabilities, geometry)
        else:
            (output / "validation" / f"{case}.npz").write_bytes(b"")
            expected[case] = label
    record = {"budget_minutes": budget_minutes, "timed_iterations": 25, "seconds_per_iteration_timed": 0.7,
              "seconds_per_epoch_end": 2.5, "epochs": 3,
              "iterations_per_epoch": 25, "val_iterations_per_epoch": 5, "iterations": 75,
              "seconds_per_iteration": 0.8, "training_seconds": 60.0, "batch_size": 12, "patch_size": [64, 64],
              "nnunet_version": "2.8.1"}
    (output / nnunet_budget.RECORD_FILE).write_text(json.dumps(record))
    return fold_dir, dataset, output, expected


def test_predictions_are_mapped_back_to_the_original_geometry(prepared):
    fold_dir, dataset, output, expected = _finished_nnunet_run(prepared, "nnunet_ours", 2)
    test_cases = dataset["split"]["test"]
    predictions = nnunet.predictions_in_original_space("nnunet_ours", output, fold_dir, test_cases)
    cases = {case.case_id: case for case in find_myops380_cases(prepared / "raw")}
    for case in test_cases:
        np.testing.assert_array_equal(predictions[case], expected[case])
        reference = load_case(cases[case], LABEL_MAPS["MyoPS380"]).label
        assert predictions[case].shape == reference.shape
        overlap = np.logical_and(predictions[case] > 0, reference > 0).sum()
        assert 2 * overlap / ((predictions[case] > 0).sum() + (reference > 0).sum()) > 0.85
    case = test_cases[0]
    archive = np.load(output / "validation" / f"{case}.npz")["probabilities"]
    np.savez_compressed(output / "validation" / f"{case}.npz", probabilities=archive.transpose(0, 2, 1, 3))
    with pytest.raises(result_files.BenchmarkError, match="axis order"):
        nnunet.predictions_in_original_space("nnunet_ours", output, fold_dir, test_cases)


def test_run_appends_records_the_report_lists_and_a_rerun_is_skipped(prepared, caplog):
    _finished_nnunet_run(prepared, "nnunet_own", 0, budget_minutes=2.0)
    _, _, dataset = fold_input(prepared, 0)
    arguments = ["--data", str(prepared / "data"), "--out", str(prepared / "out"), "--variant", "nnunet_own",
                 "--fold", "0", "--budget_minutes", "2", "--iterations_per_epoch", "25", "--nnunet_venv",
                 str(prepared / "no_venv")]
    assert nnunet.main(arguments) == 0
    records = result_files.read_results(prepared / "out" / "results.jsonl")
    assert len(records) == 2 * 5 and {r["case"] for r in records} == set(dataset["split"]["test"])
    first = records[0]
    assert {key: first[key] for key in ("input", "variant", "setting", "fold", "mode", "budget_minutes",
                                        "iterations", "seconds_per_step", "train_seconds", "max_epochs")} == {
        "input": "data", "variant": "nnunet_own", "setting": "time 2 min", "fold": 0, "mode": "time",
        "budget_minutes": 2.0, "iterations": 75, "seconds_per_step": 0.8, "train_seconds": 60.0, "max_epochs": 3}
    assert all(r["dice"] in (None, 1.0) for r in records) and any(r["dice"] == 1.0 for r in records)
    assert first["machine"] == result_files.machine_description("cpu")
    assert nnunet.main(arguments) == 0 and "already in" in caplog.text
    assert len(result_files.read_results(prepared / "out" / "results.jsonl")) == 10
    table = report.report_table(result_files.read_results(prepared / "out" / "results.jsonl"))
    assert "| nnunet_own | data | time 2 min | 0 | scar |" in table
    arguments[arguments.index("--budget_minutes") + 1] = "3"
    assert nnunet.main(arguments + ["--timed_iterations", "0"]) == 1 and "must be positive" in caplog.text
    assert nnunet.main(arguments) == 1 and "no_venv/bin/nnUNetv2_train not found" in caplog.text, "a new budget trains"
    record_file = nnunet.fold_output(nnunet.nnunet_root(prepared / "out", "data", "nnunet_own", 0), "time 2 min", 0) / \
        nnunet_budget.RECORD_FILE
    record_file.write_text(record_file.read_text().replace('"timed_iterations": 25', '"timed_iterations": 30'))
    (prepared / "out" / "results.jsonl").unlink()
    arguments[arguments.index("--budget_minutes") + 1] = "2"
    assert nnunet.main(arguments) == 1 and "was trained with other budget settings" in caplog.text
