"""The review release's artefacts read here: its intensity scaling, its processed-data layout, its metric protocol."""
import csv
import json
import math

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

import predict as predict_script
import preprocess_data
import test as test_script
import train as train_script
from datasets import phantom
from datasets.dataset_myops import MyoPSDataset
from datasets.layouts import DataError
from datasets.preprocessing_record import RELEASE_PREPROCESSING
from datasets.preprocessing import scale_like_release
from datasets.vocabulary import MODALITIES
from conftest import write_test_priors
from utils import dice_hd95, released_case_metrics, released_dice_hd95, summarise_released

SIZE, DEPTH = 64, 3
TRAIN_CASES, TEST_CASES = ("case0002", "case0003", "case0004", "case0005"), ("case0001", "case0006")
MODALITY_OFFSET = {"bSSFP": 0.0, "LGE": 0.2, "T2w": 0.4}  # tells the sequences apart when read back


# --- 3a: --intensity released ---------------------------------------------------------------------------------

def test_release_scaling_clips_to_0_255_and_divides():
    image = np.array([-10.0, 0.0, 127.5, 255.0, 300.0, np.nan])
    scaled, value_range = scale_like_release(image)
    np.testing.assert_array_equal(scaled, np.array([0.0, 0.0, 0.5, 1.0, 1.0, 0.0], np.float32))
    assert scaled.dtype == np.float32 and value_range == (0.0, 255.0)


def _write_raw_myops380(root, rng):
    """Three cases in the MyoPS380 raw layout, 1 mm spacing, intensities partly outside [0, 255]."""
    raw = {}
    for case in ("case0001", "case0002", "case0003"):
        label = np.zeros((16, 16, 2), np.uint8)
        label[4:12, 4:12] = 1
        label[5:8, 5:8] = 2
        label[9:11, 9:11] = 3
        paths = {m: root / "Raw_data" / m / f"{case}.nii.gz" for m in MODALITIES}
        paths["label"] = root / "Raw_data" / "label" / f"{case}_gt.nii.gz"
        for role, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            data = label if role == "label" else rng.uniform(-50.0, 400.0, label.shape).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
            raw[case, role] = data
    return raw


def test_preprocessing_with_released_intensity_and_its_record(tmp_path):
    raw = _write_raw_myops380(tmp_path / "raw", np.random.default_rng(3))
    common = ["--dataset", "MyoPS380", "--src_path", str(tmp_path / "raw"), "--spacing", "0", "--crop_size", "16",
              "--test_every", "3"]
    assert preprocess_data.main([*common, "--dst_path", str(tmp_path / "released"), "--intensity", "released"]) == 0
    assert preprocess_data.main([*common, "--dst_path", str(tmp_path / "percentile")]) == 0

    def expected(case, modality):
        return np.clip(raw[case, modality], 0, 255) / 255

    released = tmp_path / "released"
    record = json.loads((released / "dataset.json").read_text())
    assert record["settings"]["intensity"] == "released" and "percentiles" not in record["settings"]
    (test_case,), train_case = record["split"]["test"], record["split"]["train"][0]
    for modality in MODALITIES:
        with h5py.File(released / modality / "test_vol_h5" / f"{test_case}.npy.h5", "r") as handle:
            assert handle.attrs["intensity"] == "released" and "percentiles" not in handle.attrs
            np.testing.assert_allclose(handle["image"][:], expected(test_case, modality), atol=1e-6)
        with np.load(released / modality / "train_npz" / f"{train_case}_slice001.npz") as data:
            np.testing.assert_allclose(data["image"], expected(train_case, modality)[..., 1], atol=1e-6)

    percentile = tmp_path / "percentile"
    settings = json.loads((percentile / "dataset.json").read_text())["settings"]
    assert settings["intensity"] == "percentile" and settings["percentiles"] == [0.5, 99.5]
    with h5py.File(percentile / "LGE" / "test_vol_h5" / f"{test_case}.npy.h5", "r") as handle:
        assert handle.attrs["intensity"] == "percentile" and list(handle.attrs["percentiles"]) == [0.5, 99.5]
        assert not np.allclose(handle["image"][:], expected(test_case, "LGE"), atol=1e-3)


# --- 3b: the release's Processed_data and list/ as they are ---------------------------------------------------

def _label_volume(index):
    """A myocardial ring with a scar wedge and, except in case index 0, edema beside it."""
    y, x = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(y - SIZE / 2, x - SIZE / 2)
    label = np.zeros((SIZE, SIZE, DEPTH), np.float32)
    for z in range(DEPTH):
        ring = (radius > 12 + z) & (radius < 20 + z)
        label[ring, z] = 1
        label[ring & (x > SIZE / 2 + 4), z] = 2
        if index:
            label[ring & (y > SIZE / 2 + 8) & (x <= SIZE / 2 + 4), z] = 3
    return label


def _image(label, modality, rng):
    return np.clip(0.2 + 0.15 * label + MODALITY_OFFSET[modality] + rng.normal(0, 0.02, label.shape), 0, 1
                   ).astype(np.float32)


@pytest.fixture(scope="module")
def release_layout(tmp_path_factory):
    """A tiny folder written the way the release's preprocess_data.py writes it (np.savez, h5py, float32 labels)."""
    root = tmp_path_factory.mktemp("release")
    data, lists = root / "MyoPS380_dataset" / "Processed_data", root / "list"
    lists.mkdir()
    rng = np.random.default_rng(0)
    for modality in MODALITIES:
        (data / modality / "train_npz").mkdir(parents=True)
        (data / modality / "test_vol_h5").mkdir(parents=True)
    for index, case in enumerate(sorted(TRAIN_CASES + TEST_CASES)):
        label = _label_volume(index)
        images = {modality: _image(label, modality, rng) for modality in MODALITIES}
        for modality in MODALITIES:
            if case in TEST_CASES:
                handle = h5py.File(data / modality / "test_vol_h5" / f"{case}.npy.h5", "w")
                handle["image"] = images[modality]
                handle["label"] = label
                handle.close()
            else:
                for z in range(DEPTH):
                    np.savez(data / modality / "train_npz" / f"{case}_slice{z:03d}.npz", label=label[:, :, z],
                             image=images[modality][:, :, z])
    (lists / "train.txt").write_text("".join(f"{case}_slice{z:03d}\n" for case in TRAIN_CASES for z in range(DEPTH)))
    (lists / "test_vol.txt").write_text("".join(f"{case}\n" for case in TEST_CASES))
    (lists / "all.txt").write_text("".join(f"{case}.npy.h5\n" for case in sorted(TRAIN_CASES + TEST_CASES)))
    return root


def test_release_processed_data_is_read_as_it_is(release_layout):
    data, lists = release_layout / "MyoPS380_dataset" / "Processed_data", release_layout / "list"
    slices = MyoPSDataset(data, lists, "train")
    assert len(slices) == len(TRAIN_CASES) * DEPTH
    item = slices[4]
    assert item["case_name"] == "case0003_slice001" and item["image"].shape == (3, SIZE, SIZE)
    assert item["label"].dtype == torch.int64 and set(item["label"].unique().tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(item["label"].numpy(), _label_volume(2)[:, :, 1])
    background = item["image"][:, item["label"] == 0].mean(dim=1)
    assert torch.all(background.diff() > 0.15), "channels in the order bSSFP, LGE, T2w"

    volumes = MyoPSDataset(data, lists, "test_vol")
    volume = volumes[0]
    assert volume["case_name"] == "case0001" and volume["image"].shape == (3, SIZE, SIZE, DEPTH)
    assert volume["geometry"] is None and volume["meta"] == {}
    np.testing.assert_array_equal(volume["label"].numpy(), _label_volume(0))


def test_bad_release_files_are_named(tmp_path):
    folder = tmp_path / "bSSFP" / "train_npz"
    for modality in MODALITIES:
        (tmp_path / modality / "train_npz").mkdir(parents=True)
        np.savez(tmp_path / modality / "train_npz" / "c_slice000.npz", image=np.zeros((4, 4), np.float32),
                 label=np.full((4, 4), 1.5, np.float32))
    (tmp_path / "train.txt").write_text("c_slice000\n")
    with pytest.raises(DataError, match=r"c_slice000\.npz: label values must be whole numbers in 0-3, found \[1\.5\]"):
        MyoPSDataset(tmp_path, split="train")[0]
    np.savez(folder / "c_slice000.npz", img=np.zeros((4, 4), np.float32), label=np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match=r"has no array image \(expected 'image' and 'label'"):
        MyoPSDataset(tmp_path, split="train")[0]


def train_on_release_layout(release_layout, name):
    """One epoch of the testing configuration on the release's Processed_data and list/ folders; the run folder."""
    data, lists = release_layout / "MyoPS380_dataset" / "Processed_data", release_layout / "list"
    run = release_layout / name
    write_test_priors(release_layout)
    assert train_script.main(["--root_path", str(data), "--list_dir", str(lists), "--vit_name", "testing",
                              "--img_size", str(SIZE), "--no_pretrain", "--prior_embeddings",
                              str(release_layout / "priors.pt"), "--batch_size", "4", "--max_epochs", "1",
                              "--num_workers", "0", "--progress", "0", "--output_dir", str(run)]) == 0
    return run


def test_train_and_test_on_the_release_layout_with_both_protocols(release_layout, caplog):
    data, lists = release_layout / "MyoPS380_dataset" / "Processed_data", release_layout / "list"
    run = train_on_release_layout(release_layout, "run")

    out = release_layout / "evaluation"
    caplog.set_level("INFO")
    assert test_script.main(["--output_dir", str(run), "--root_path", str(data), "--list_dir", str(lists),
                             "--test_save_dir", str(out), "--protocol", "released"]) == 0
    assert "HD95 in PIXELS, not mm" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert {(entry["space"], entry["hd95_unit"]) for entry in summary.values()} == {("voxels", "voxel")}
    info = json.loads((out / "test_info.json").read_text())
    assert info["space"] == {case: "voxels" for case in TEST_CASES} and info["protocol"] == "released"

    released = json.loads((out / "summary_released_protocol.json").read_text())
    assert "not a physical distance" in released["hd95_unit"]
    rows = list(csv.DictReader(open(out / "metrics_released_protocol.csv")))
    assert len(rows) == 5 * len(TEST_CASES)
    per_case = {}
    for case in TEST_CASES:
        prediction = np.asarray(nib.load(str(out / f"{case}_pred.nii.gz")).dataobj)  # the processed grid here
        reference = _label_volume(sorted(TRAIN_CASES + TEST_CASES).index(case))
        per_case[case] = released_case_metrics(prediction, reference)
    for row in rows:
        expected = per_case[row["case"]][row["structure"]]
        assert float(row["dice"]) == pytest.approx(expected.dice) and float(row["hd95_px"]) == pytest.approx(
            expected.hd95) and row["rule"] == expected.rule
    for name, entry in summarise_released(list(per_case.values())).items():
        assert released["structures"][name] == pytest.approx(entry)

    ours_only = release_layout / "ours_only"  # without --root_path and --list_dir: the run's, lists apart
    assert test_script.main(["--output_dir", str(run), "--test_save_dir", str(ours_only), "--no_save_nii"]) == 0
    assert json.loads((ours_only / "summary.json").read_text()) == summary
    assert not list(ours_only.glob("*released_protocol*")), "--protocol ours is the default"


def test_a_run_on_the_release_layout_records_its_preprocessing_and_predicts_raw_cases(release_layout, tmp_path):
    """The release's Processed_data has no dataset.json: it is recognised, and its scaling and grid are recorded, so
    that test.py checks them and predict.py applies them to raw cases."""
    run = train_on_release_layout(release_layout, "recorded_run")
    recorded = torch.load(run / "last.pth", map_location="cpu", weights_only=True)["preprocessing"]
    assert recorded == RELEASE_PREPROCESSING and recorded["settings"]["intensity"] == "released"
    phantom.write_phantom(tmp_path / "raw", cases=2, seed=3)
    out = tmp_path / "predicted"
    assert predict_script.main(["--input_dir", str(tmp_path / "raw"), "--output_dir", str(out), "--run", str(run),
                                "--device", "cpu"]) == 0
    assert sorted(path.name for path in out.glob("*.nii.gz")) == ["case0001.nii.gz", "case0002.nii.gz"]


def test_test_data_without_a_preprocessing_record_is_refused_unless_allowed(release_layout, tmp_path, caplog):
    run = release_layout / "run"  # trained above on the release layout, whose record it holds
    data, lists = tmp_path / "unrecorded", release_layout / "list"
    (data / "LGE").mkdir(parents=True)  # neither a dataset.json nor the release's layout
    for modality in MODALITIES:
        source = release_layout / "MyoPS380_dataset" / "Processed_data" / modality / "test_vol_h5"
        (data / modality).mkdir(exist_ok=True)
        for path in source.iterdir():
            (data / modality / path.name).write_bytes(path.read_bytes())
    assert test_script.main(["--output_dir", str(run), "--root_path", str(data), "--list_dir", str(lists),
                             "--test_save_dir", str(tmp_path / "refused")]) == 1
    assert f"{data} has no dataset.json (preprocess_data.py writes one)" in caplog.text
    assert "--allow_preprocessing_mismatch" in caplog.text


# --- 4: the released metric protocol on hand-computed cases --------------------------------------------------

def test_released_metrics_on_hand_computed_cases():
    reference = np.zeros((10, 10, 3), bool)
    reference[2:6, 2:6, 1] = True  # 16 voxels
    shifted = np.zeros_like(reference)
    shifted[2:6, 3:7, 1] = True  # one column over: overlap 12; 8 of the 32 surface distances are 1 px
    score = released_dice_hd95(shifted, reference)
    assert score == (pytest.approx(2 * 12 / 32), pytest.approx(1.0), "both_present")
    assert dice_hd95(shifted, reference, (0.5, 2.0, 10.0))[1] == pytest.approx(2.0), "ours: mm, not pixels"
    stacked = np.zeros_like(reference)
    stacked[2:6, 2:6, 2] = True  # the next slice: one pixel away, whatever the slice spacing
    assert released_dice_hd95(stacked, reference) == (0.0, pytest.approx(1.0), "both_present")

    empty = np.zeros_like(reference)
    assert released_dice_hd95(empty, reference) == (1.0, 0.0, "empty_scored_1"), "a missed small structure"
    assert released_dice_hd95(reference, empty) == (1.0, 0.0, "empty_scored_1"), "a small false positive"
    assert released_dice_hd95(empty, empty) == (1.0, 0.0, "empty_scored_1")
    ours = dice_hd95(empty, reference, (1.0, 1.0, 1.0))
    assert ours[0] == 0.0 and math.isnan(ours[1])


@pytest.mark.parametrize("predicted, present, expected", [
    (0, 200, (1.0, 0.0)), (0, 201, (0.0, 0.0)),  # empty prediction: reference at most 200 voxels scores perfect
    (199, 0, (1.0, 0.0)), (200, 0, (0.0, 0.0)),  # empty reference: prediction below 200 voxels scores perfect
])
def test_released_rule_for_empty_structures_at_its_limits(predicted, present, expected):
    def volume(count):
        flat = np.zeros(20 * 20 * 2, bool)
        flat[:count] = True
        return flat.reshape(20, 20, 2)

    score = released_dice_hd95(volume(predicted), volume(present))
    assert (score.dice, score.hd95) == expected
    assert score.rule == ("empty_scored_1" if expected[0] else "empty_scored_0")


def test_released_structures_and_plain_means():
    reference = np.zeros((8, 8, 1), np.uint8)
    reference[1:7, 1:7] = 1
    reference[2:4, 2:4] = 2
    reference[4:6, 4:6] = 3
    prediction = reference.copy()
    prediction[prediction == 3] = 2  # edema called scar
    metrics = released_case_metrics(prediction, reference)
    assert metrics["myocardium"].dice == 1.0 and metrics["whole_myocardium"].dice == 1.0
    assert metrics["scar_edema"].dice == 1.0 and metrics["scar"].dice == pytest.approx(2 * 4 / 12)
    assert metrics["edema"] == (1.0, 0.0, "empty_scored_1"), "4 missed edema voxels score as perfect"
    perfect = released_case_metrics(reference, reference)
    summary = summarise_released([metrics, perfect])
    assert summary["edema"] == {"dice": 1.0, "dice_std": 0.0, "hd95_px": 0.0, "hd95_px_std": 0.0, "n": 2,
                                "n_both_present": 1, "n_empty_scored_1": 1, "n_empty_scored_0": 0}
    assert summary["scar"]["dice"] == pytest.approx((2 * 4 / 12 + 1.0) / 2)
