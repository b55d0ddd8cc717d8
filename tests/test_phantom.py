import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import ROOT
from datasets import phantom
from datasets.phantom import generate_case, write_phantom
from datasets.vocabulary import MODALITIES

RUN_CASES = 20
MIN_REGION_PX_AT_1_4_MM = 30


@pytest.fixture(scope="module")
def run():
    """The cases of a default 20-case run (seed 0), generated once for the module."""
    return [generate_case(index, 0) for index in range(1, RUN_CASES + 1)]


@pytest.fixture(scope="module")
def pathological(run):
    return [case for case in run if np.any(case["label"] == 2)]


def load(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def lv_blood_pool(label):
    """Background enclosed by the myocardial ring, slice by slice."""
    filled = np.stack([ndimage.binary_fill_holes(label[:, :, k] > 0) for k in range(label.shape[2])], axis=-1)
    return filled & (label == 0)


def region_mean(case, sequence, mask):
    return float(case["images"][sequence][mask].mean())


def test_writes_the_myops_raw_layout(tmp_path):
    assert write_phantom(tmp_path, cases=2, seed=0) == ["case0001", "case0002"]
    raw = tmp_path / "Raw_data"
    assert sorted(p.name for p in raw.iterdir()) == sorted([*MODALITIES, "label"])
    for sequence in MODALITIES:
        assert sorted(os.listdir(raw / sequence)) == ["case0001.nii.gz", "case0002.nii.gz"]
    assert sorted(os.listdir(raw / "label")) == ["case0001_gt.nii.gz", "case0002_gt.nii.gz"]


def test_files_of_a_case_share_shape_and_affine_and_match_generate_case(tmp_path):
    write_phantom(tmp_path, cases=1, seed=3)
    case = generate_case(1, 3)
    raw = tmp_path / "Raw_data"
    label, label_affine = load(raw / "label" / "case0001_gt.nii.gz")
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(label, case["label"])
    np.testing.assert_allclose(label_affine, case["affine"])
    for sequence in MODALITIES:
        image, affine = load(raw / sequence / "case0001.nii.gz")
        assert image.dtype == np.float32 and image.shape == label.shape
        np.testing.assert_array_equal(affine, label_affine)
        np.testing.assert_array_equal(image, case["images"][sequence])


def test_geometry_is_within_the_specified_ranges(run):
    for case in run:
        affine, label = case["affine"], case["label"]
        x, y, z = label.shape
        assert 144 <= x <= 176 and 144 <= y <= 176 and 6 <= z <= 9
        spacing = np.diag(affine)[:3]
        assert np.count_nonzero(affine[:3, :3] - np.diag(spacing)) == 0, "axis-aligned"
        assert spacing[0] == spacing[1] and 1.0 <= spacing[0] <= 1.3 and 8.0 <= spacing[2] <= 10.0
        assert all(image.shape == label.shape for image in case["images"].values())
        centre = np.array(ndimage.center_of_mass(label[:, :, 0] > 0)) - (np.array([x, y]) - 1) / 2
        assert np.linalg.norm(centre * spacing[0]) < 12.0, "LV centre near the image centre"


def test_a_case_depends_only_on_index_and_seed():
    first, again = generate_case(2, 5), generate_case(2, 5)
    other_seed, other_index = generate_case(2, 6), generate_case(3, 5)
    np.testing.assert_array_equal(first["label"], again["label"])
    np.testing.assert_array_equal(first["affine"], again["affine"])
    for sequence in MODALITIES:
        np.testing.assert_array_equal(first["images"][sequence], again["images"][sequence])
        for different in (other_seed, other_index):
            assert (different["images"][sequence].shape != first["images"][sequence].shape
                    or not np.array_equal(different["images"][sequence], first["images"][sequence]))


def test_intensities_are_raw_scanner_like(run):
    for case in run[:5]:
        for image in case["images"].values():
            assert image.dtype == np.float32 and np.isfinite(image).all()
            assert image.min() >= 0 and 100 < image.max() < 5000
    maxima = [case["images"][sequence].max() for case in run[:5] for sequence in MODALITIES]
    assert np.ptp(maxima) > 500, "the scale varies between cases and sequences"


def test_some_cases_are_healthy_and_most_pathological(run, pathological):
    assert 1 <= RUN_CASES - len(pathological) < RUN_CASES // 2


def test_bssfp_shows_anatomy_but_not_pathology(run, pathological):
    for case in run:
        label = case["label"]
        assert region_mean(case, "bSSFP", lv_blood_pool(label)) > 2 * region_mean(case, "bSSFP", label == 1)
    for case in pathological:
        ratio = region_mean(case, "bSSFP", case["label"] == 2) / region_mean(case, "bSSFP", case["label"] == 1)
        assert ratio == pytest.approx(1.0, abs=0.15)


def test_lge_shows_scar_and_t2w_shows_edema(pathological):
    for case in pathological:
        label = case["label"]
        assert region_mean(case, "LGE", label == 2) > 3 * region_mean(case, "LGE", label == 1)
        assert region_mean(case, "T2w", label == 3) > 1.5 * region_mean(case, "T2w", label == 1)
        assert region_mean(case, "T2w", lv_blood_pool(label)) < region_mean(case, "T2w", label == 1)


def test_edema_surrounds_scar_in_the_myocardium(pathological):
    for case in pathological:
        label = case["label"]
        scar = label == 2
        assert np.any(ndimage.binary_dilation(scar, np.ones((3, 3, 1), bool)) & (label == 3)), "edema next to scar"
        scar_slices = np.flatnonzero(scar.any(axis=(0, 1)))
        assert np.all((label == 3).any(axis=(0, 1))[scar_slices]), "edema on every slice with scar"
        assert np.any(np.diff(scar_slices) == 1), "scar on at least two neighbouring slices"


def test_scar_and_edema_are_big_enough_to_segment(pathological):
    for case in pathological:
        label, spacing = case["label"], case["affine"][0, 0]
        for value in (2, 3):
            pixels = (label == value).sum(axis=(0, 1))
            pixels_at_1_4_mm = pixels[pixels > 0] * (spacing / 1.4) ** 2
            assert pixels_at_1_4_mm.min() >= MIN_REGION_PX_AT_1_4_MM


def test_a_failed_write_leaves_no_files(tmp_path, monkeypatch):
    def fail(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(phantom.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_phantom(tmp_path, cases=1, seed=0)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_command_line_writes_the_cases_and_logs_a_summary(tmp_path):
    result = subprocess.run([sys.executable, "-m", "datasets.phantom", "--out", str(tmp_path), "--cases", "1",
                             "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "case0001" in result.stderr and "1 cases (" in result.stderr
    assert (tmp_path / "Raw_data" / "label" / "case0001_gt.nii.gz").is_file()
    assert result.stdout == ""
