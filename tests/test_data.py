"""Preprocessing, geometry, datasets and augmentation, on the phantom and on small volumes written here."""
import filecmp
import json

import nibabel as nib
import numpy as np
import pytest

import preprocess_data
from datasets import dataset_writer
from datasets.dataset_myops import MyoPSDataset, RandomGenerator
from datasets.geometry import plan_geometry, probabilities_to_original, to_original, to_processed
from datasets.layouts import DataError, find_myops2020_cases, map_labels
from datasets.phantom import write_phantom
from datasets.vocabulary import LABEL_MAPS


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 1.0 if not a.any() and not b.any() else 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_raw")
    write_phantom(root, cases=5, seed=3)
    return root


def preprocess(src, dst, *extra):
    return preprocess_data.main(["--dataset", "Phantom", "--src_path", str(src), "--dst_path", str(dst), *extra])


@pytest.fixture(scope="module")
def phantom_processed(phantom_raw, tmp_path_factory):
    dst = tmp_path_factory.mktemp("phantom") / "processed"
    assert preprocess(phantom_raw, dst, "--test_every", "5", "--val_fraction", "0.25") == 0
    return dst


def test_phantom_round_trip_through_preprocessing_and_datasets(phantom_processed):
    info = json.loads((phantom_processed / "dataset.json").read_text())
    split = info["split"]
    assert split["test"] == ["case0001"] and len(split["val"]) == 1
    assert sorted(split["train"] + split["val"]) == ["case0002", "case0003", "case0004", "case0005"]
    assert (phantom_processed / "val.txt").read_text() == f"{split['val'][0]}\n"
    assert (phantom_processed / "test_vol.txt").read_text() == "case0001\n"
    train = MyoPSDataset(phantom_processed, split="train")
    assert len(train) == info["summary"]["slices"]["train"] > 0
    item = train[0]
    assert item["image"].shape == (3, 128, 128) and item["label"].shape == (128, 128)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert set(np.unique(item["label"].numpy())) <= {0, 1, 2, 3}
    for split in ("val", "test_vol"):
        volume = MyoPSDataset(phantom_processed, split=split)[0]
        assert volume["image"].shape[:3] == (3, 128, 128) and volume["image"].shape[3] == volume["label"].shape[2]
        assert volume["geometry"].crop_size == (128, 128)


def test_processed_label_maps_back_onto_the_original(phantom_raw, tmp_path):
    dst = tmp_path / "kept_spacing"
    assert preprocess(phantom_raw, dst, "--spacing", "0", "--test_every", "1") == 0
    for case in ("case0001", "case0004"):
        volume = MyoPSDataset(dst, split="test_vol")[int(case[-1]) - 1]
        original = nib.load(str(phantom_raw / "Raw_data" / "label" / f"{case}_gt.nii.gz"))
        restored = to_original(volume["label"].numpy().astype(np.uint8), volume["geometry"], order=0)
        assert restored.shape == original.shape
        assert np.array_equal(restored, np.asarray(original.dataobj)), "crop/pad only: exact"
        np.testing.assert_allclose(volume["geometry"].affine_array, original.affine)


def _structures(shape=(97, 83, 3)):
    rng = np.random.default_rng(0)
    label = np.zeros(shape, np.uint8)
    label[30:70, 20:60] = 1
    label[40:50, 25:45] = 2
    label[55:66, 40:55, 1:] = 3
    label[rng.random(label.shape) < 0.002] = 1
    return label


@pytest.mark.parametrize("spacing, target, crop, exact", [
    ((1.0, 1.0, 8.0), None, 128, True),  # padding only
    ((2.0, 2.0, 8.0), 1.0, 200, True),  # integer upsampling
    ((0.73, 0.73, 12.0), 1.4, 64, False),  # real-data-like downsampling
])
def test_geometry_round_trips(spacing, target, crop, exact):
    label = _structures()
    geometry = plan_geometry(label.shape, spacing, np.diag(list(spacing) + [1.0]), target, crop)
    processed = to_processed(label, geometry, order=0)
    assert processed.shape == (crop, crop, 3)
    restored = to_original(processed, geometry, order=0)
    assert restored.shape == label.shape
    for k in (1, 2, 3):
        score = dice(restored == k, label == k)
        assert score == 1.0 if exact else score > 0.85


def test_cropping_keeps_the_centre_exactly():
    label = _structures()
    geometry = plan_geometry(label.shape, (1.0, 1.0, 8.0), np.eye(4), None, 64)
    assert geometry.crop_start == (16, 9)
    restored = to_original(to_processed(label, geometry, order=0), geometry, order=0)
    np.testing.assert_array_equal(restored[16:80, 9:73], label[16:80, 9:73])
    assert restored[:16].max() == 0 and restored[:, 73:].max() == 0


def test_probabilities_return_to_the_original_grid():
    label = np.zeros((60, 50, 2), np.uint8)
    label[20:40, 15:35] = 1
    label[25:30, 20:30] = 2
    geometry = plan_geometry(label.shape, (0.8, 0.8, 10.0), np.eye(4), 1.2, 48)
    one_hot = np.stack([to_processed((label == k).astype(np.float32), geometry, order=1) for k in range(4)])
    restored = probabilities_to_original(one_hot, geometry)
    assert restored.shape == label.shape
    assert dice(restored == 1, label == 1) > 0.9 and dice(restored == 2, label == 2) > 0.8


def test_myops2020_label_mapping_and_layouts(tmp_path):
    codes = np.array([[0, 200, 500], [600, 1220, 2221]], dtype=np.float64)[..., None]
    mapped = map_labels(codes, LABEL_MAPS["MyoPS2020"], "Case0001", "x_gd.nii.gz")
    np.testing.assert_array_equal(mapped[..., 0], [[0, 1, 0], [0, 3, 2]])
    with pytest.raises(DataError, match=r"case Case0001: label file x_gd.nii.gz holds values \[300\]"):
        map_labels(np.array([[0, 300]]), LABEL_MAPS["MyoPS2020"], "Case0001", "x_gd.nii.gz")

    flat, per_case = tmp_path / "flat", tmp_path / "per_case"
    (per_case / "Case3001").mkdir(parents=True)
    flat.mkdir()
    for code in ("C0", "DE", "T2", "gd"):
        (flat / f"myops_training_101_{code}.nii.gz").touch()
    for code in ("C0", "LGE", "T2", "gd"):
        (per_case / "Case3001" / f"Case3001_{code}.nii.gz").touch()
    flat_case, = find_myops2020_cases(flat)
    assert flat_case.case_id == "myops_training_101" and flat_case.images["LGE"].name.endswith("_DE.nii.gz")
    per, = find_myops2020_cases(per_case)
    assert per.case_id == "Case3001" and per.images["bSSFP"].name == "Case3001_C0.nii.gz"
    (per_case / "Case3001" / "Case3001_T2.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case Case3001: missing T2w file .*Case3001_T2.nii.gz"):
        find_myops2020_cases(per_case)


def _write_myops2020_case(folder, case="Case0001", shape=(40, 36, 3), spacing=(0.75, 0.75, 12.0)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    affine = np.diag(list(spacing) + [1.0])
    label = np.zeros(shape)
    label[10:30, 10:26] = 200
    label[14:20, 12:20] = 2221
    label[20:26, 12:20] = 1220
    label[2:6, 2:6] = 500
    for code in ("C0", "LGE", "T2"):
        nib.save(nib.Nifti1Image((rng.random(shape) * 1500).astype(np.float32), affine),
                 folder / f"{case}_{code}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.int16), affine), folder / f"{case}_gd.nii.gz")
    return folder


def _corrupt(kind, folder):
    path = folder / f"{folder.name}_{'LGE' if kind != 'label' else 'gd'}.nii.gz"
    image = nib.load(str(path))
    data = np.asarray(image.dataobj).astype(np.float32)
    if kind == "missing":
        path.unlink()
    elif kind == "shape":
        nib.save(nib.Nifti1Image(data[:-2], image.affine), path)
    elif kind == "geometry":
        shifted = image.affine.copy()
        shifted[0, 3] += 3.0
        nib.save(nib.Nifti1Image(data, shifted), path)
    elif kind == "label":
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data.astype(np.int16), image.affine), path)
    elif kind == "nan":
        data[1, 1, 1] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine), path)
    elif kind == "empty":
        nib.save(nib.Nifti1Image(np.zeros_like(data), image.affine), path)
    elif kind == "unreadable":
        path.write_bytes(b"not a nifti file")
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing LGE file"), ("shape", "has shape"), ("geometry", "is not aligned"),
    ("label", r"holds values \[7\]"), ("nan", "NaN or infinite"), ("empty", "is empty"),
    ("unreadable", "cannot read LGE file"),
])
def test_bad_input_is_reported_and_nothing_is_written(tmp_path, caplog, kind, message):
    src = tmp_path / "src"
    _write_myops2020_case(src / "Case0001")
    _write_myops2020_case(src / "Case0002", case="Case0002")
    path = _corrupt(kind, src / "Case0001")
    dst = tmp_path / "dst"
    code = preprocess_data.main(["--dataset", "MyoPS2020", "--src_path", str(src), "--dst_path", str(dst),
                                 "--test_every", "2"])
    assert code == 1
    assert "Case0001" in caplog.text and path.name in caplog.text
    assert any(__import__("re").search(message, r.getMessage()) for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "no output and no staging folder left"


def test_failed_rerun_keeps_the_previous_output(tmp_path):
    src = tmp_path / "src"
    _write_myops2020_case(src / "Case0001")
    _write_myops2020_case(src / "Case0002", case="Case0002")
    dst = tmp_path / "dst"
    arguments = ["--dataset", "MyoPS2020", "--src_path", str(src), "--dst_path", str(dst), "--test_every", "2"]
    assert preprocess_data.main(arguments) == 0
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    _corrupt("label", src / "Case0002")
    assert preprocess_data.main(arguments) == 1
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
    assert json.loads((dst / "dataset.json").read_text())["summary"]["cases"] == {"train": 1, "val": 0, "test": 1}


def test_foreign_destination_is_not_overwritten(tmp_path, caplog):
    src = _write_myops2020_case(tmp_path / "src" / "Case0001").parent
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert preprocess_data.main(["--dataset", "MyoPS2020", "--src_path", str(src), "--dst_path", str(dst),
                                 "--test_every", "0"]) == 1
    assert "not an output of preprocess_data.py" in caplog.text
    assert (dst / "notes.txt").read_text() == "mine"


def test_rerun_gives_identical_files(phantom_raw, phantom_processed, tmp_path):
    again = tmp_path / "again"
    assert preprocess(phantom_raw, again, "--test_every", "5", "--val_fraction", "0.25") == 0
    assert preprocess(phantom_raw, again, "--test_every", "5", "--val_fraction", "0.25") == 0
    first = sorted(p.relative_to(phantom_processed) for p in phantom_processed.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    differing = [str(p) for p in first if p.name != "dataset.json"
                 and not filecmp.cmp(phantom_processed / p, again / p, shallow=False)]
    assert differing == []
    train_lines = (again / "train.txt").read_text().splitlines()
    assert len(train_lines) == len(set(train_lines)) == len((phantom_processed / "train.txt").read_text().split())


def test_split_rules(tmp_path):
    cases = [f"c{i:02d}" for i in range(1, 11)]
    split = dataset_writer.split_cases(cases, test_every=5)
    assert split["test"] == ["c01", "c06"] and split["val"] == [] and len(split["train"]) == 8
    with_val = dataset_writer.split_cases(cases, test_every=5, val_fraction=0.25, seed=7)
    assert len(with_val["val"]) == 2 and with_val == dataset_writer.split_cases(cases, 5, 0.25, 7)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"test": ["c01"], "val": ["c02", "c99"]}))
    with pytest.raises(DataError, match="c99"):
        dataset_writer.split_cases(cases, split_file=split_file)


@pytest.mark.parametrize("preset", ["paper", "strong", "nnunet"])
def test_augmentation_keeps_sequences_and_label_aligned(preset):
    label = np.zeros((96, 96), np.int64)
    label[20:60, 30:80] = 1
    label[40:70, 10:40] = 2
    label[65:90, 50:90] = 3
    image = np.stack([(label == k).astype(np.float32) for k in (1, 2, 3)])
    transform = RandomGenerator((64, 64), preset)
    rng = np.random.default_rng(0)
    for _ in range(25):
        out = transform({"image": image, "label": label}, rng=rng)
        assert out["image"].shape == (3, 64, 64) and out["label"].shape == (64, 64)
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
        warped_label = out["label"].numpy()
        for k in (1, 2, 3):
            if (warped_label == k).sum() > 20:
                assert dice(out["image"][k - 1].numpy() > 0.3, warped_label == k) > 0.9


def test_augmentation_presets():
    with pytest.raises(ValueError, match="unknown augmentation"):
        RandomGenerator((64, 64), "extreme")
    label = np.zeros((64, 64), np.int64)
    label[28:36, 28:36] = 1
    image = np.stack([label.astype(np.float32)] * 3)
    rng = np.random.default_rng(1)
    areas = [RandomGenerator((64, 64), "strong")({"image": image, "label": label}, rng=rng)["label"].sum().item()
             for _ in range(60)]
    assert min(areas) < 64 < max(areas), "the strong preset zooms out as well as in"


def test_elastic_deformation_moves_image_and_label_together():
    label = np.zeros((64, 64), np.int64)
    label[16:48, 20:44] = 1
    label[24:40, 28:36] = 2
    image = np.stack([(label == k).astype(np.float32) for k in (1, 2, 1)])
    plain, elastic = RandomGenerator((64, 64), "strong"), RandomGenerator((64, 64), "nnunet")
    elastic.ranges = {**elastic.ranges, "elastic_p": 1.0, "elastic_alpha": (600.0, 600.0), "contrast_p": 0.0,
                      "blur_p": 0.0, "window": (1.0, 1.0)}
    deformed = 0
    for seed in range(10):
        out = elastic({"image": image, "label": label}, rng=np.random.default_rng(seed))
        warped = out["label"].numpy()
        assert dice(out["image"][1].numpy() > 0.3, warped == 2) > 0.85
        ranges = dict(elastic.ranges)
        elastic.ranges = {**ranges, "elastic_p": 0.0}
        rigid = elastic({"image": image, "label": label}, rng=np.random.default_rng(seed))["label"].numpy()
        elastic.ranges = ranges
        deformed += not np.array_equal(warped, rigid)
    assert deformed >= 8, "the displacement field changes the resampling"
    assert plain.ranges.keys().isdisjoint({"elastic_p", "contrast_p", "blur_p"})


@pytest.mark.parametrize("preset", ["paper", "strong"])
def test_presets_without_the_nnunet_additions_draw_the_random_numbers_they_always_drew(preset):
    """Runs made before the nnunet preset existed stay reproducible: same draws, so the same next number.
    The expected values were drawn with the RandomGenerator of commit 97406e8."""
    label = np.zeros((40, 44), np.int64)
    label[10:30, 12:30] = 1
    label[15:22, 18:26] = 2
    image = np.stack([(label > 0).astype(np.float32)] * 3)
    transform = RandomGenerator((32, 32), preset)
    following = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        transform({"image": image, "label": label}, rng=rng)
        following.append(rng.random())
    assert following == pytest.approx([0.033585575305, 0.912984780874, 0.967435952494, 0.284201163749,
                                       0.929026387765, 0.392404664335], abs=1e-11)
