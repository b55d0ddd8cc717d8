"""predict.py end to end: a tiny model trained for an epoch on the phantom, applied to raw cases without labels."""
import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import predict
from engine import prediction
import test as test_script
from datasets.layouts import DataError, find_cases
from conftest import train_tiny_run, write_phantom_training_data
from engine.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the testing configuration trained for an epoch on 3 phantom cases, and 6 cases without labels."""
    root = tmp_path_factory.mktemp("predict")
    priors = write_phantom_training_data(root, cases=6, seed=21)
    assert train_tiny_run(root / "data", priors, root / "run", "--max_epochs", "1") == 0
    unlabelled = root / "unlabelled"
    for sequence in ("bSSFP", "LGE", "T2w"):
        shutil.copytree(root / "raw" / "Raw_data" / sequence, unlabelled / "Raw_data" / sequence)
    return root


def run_predict(trained, input_dir, output_dir, *extra):
    return predict.main(["--input_dir", str(input_dir), "--output_dir", str(output_dir), "--run",
                         str(trained / "run"), "--checkpoint", "last", "--device", "cpu", *extra])


def test_predictions_have_the_input_geometry_and_equal_test_py_on_the_held_out_case(trained):
    out = trained / "predicted"
    assert run_predict(trained, trained / "unlabelled", out, "--save_png") == 0
    cases = sorted(p.name[:-len(".nii.gz")] for p in (trained / "unlabelled" / "Raw_data" / "LGE").iterdir())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in cases]
    for case in cases:
        source = nib.load(str(trained / "unlabelled" / "Raw_data" / "LGE" / f"{case}.nii.gz"))
        prediction = nib.load(str(out / f"{case}.nii.gz"))
        assert prediction.shape == source.shape
        np.testing.assert_array_equal(prediction.affine, source.affine)
        assert prediction.header.get_zooms() == source.header.get_zooms()
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 3}
        assert (out / f"{case}.png").is_file()

    held_out, = json.loads((trained / "data" / "dataset.json").read_text())["split"]["test"]
    evaluation = trained / "evaluation"
    assert test_script.main(["--output_dir", str(trained / "run"), "--checkpoint", "last", "--test_save_dir",
                             str(evaluation)]) == 0
    expected = np.asarray(nib.load(str(evaluation / f"{held_out}_pred.nii.gz")).dataobj)
    predicted = np.asarray(nib.load(str(out / f"{held_out}.nii.gz")).dataobj)
    assert predicted.any(), "the trained model finds some myocardium"
    np.testing.assert_array_equal(predicted, expected)

    rows = list(csv.DictReader(open(out / "volumes.csv")))
    assert [row["case"] for row in rows] == cases
    for row in rows:
        prediction = nib.load(str(out / f"{row['case']}.nii.gz"))
        labels = np.asarray(prediction.dataobj)
        voxel_ml = np.prod(prediction.header.get_zooms()) / 1000.0
        assert float(row["scar_ml"]) == pytest.approx((labels == 2).sum() * voxel_ml)
        assert float(row["whole_myocardium_ml"]) == pytest.approx((labels > 0).sum() * voxel_ml)
        assert row["checkpoint"].endswith("last.pth")


def _replace(path, data=None, affine=None):
    image = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) if data is None else data,
                             image.affine if affine is None else affine), str(path))


def test_bad_cases_are_named_with_their_reason_and_the_others_are_written(trained, tmp_path, caplog):
    src = tmp_path / "input"
    shutil.copytree(trained / "unlabelled", src)
    raw = src / "Raw_data"
    (raw / "T2w" / "case0002.nii.gz").unlink()
    (raw / "LGE" / "case0003.nii.gz").write_bytes(b"not a nifti file")
    (raw / "bSSFP" / "case0004.nii.gz").write_bytes(b"")
    t2 = nib.load(str(raw / "T2w" / "case0005.nii.gz"))
    _replace(raw / "T2w" / "case0005.nii.gz", data=np.asarray(t2.dataobj)[..., :-1])
    lge = nib.load(str(raw / "LGE" / "case0006.nii.gz"))
    _replace(raw / "LGE" / "case0006.nii.gz", affine=np.diag([-1.0, 1.0, 1.0, 1.0]) @ lge.affine)
    out = tmp_path / "out"
    assert run_predict(trained, src, out) == 1
    expected = {"case0002": "missing T2w file", "case0003": "cannot read LGE file",
                "case0004": "cannot read bSSFP file", "case0005": "has shape", "case0006": "is not aligned"}
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    for case, reason in expected.items():
        assert any(case in message and reason in message for message in errors), (case, reason, errors)
    assert sorted(p.name for p in out.iterdir()) == ["case0001.nii.gz", "index.html", "volumes.csv"], \
        "nothing else, no temporaries"
    rows = {row["case"]: row for row in csv.DictReader(open(out / "volumes.csv"))}
    assert sorted(rows) == ["case0001", *sorted(expected)], "volumes.csv lists the failures too"
    assert rows["case0001"]["error"] == "" and float(rows["case0001"]["whole_myocardium_ml"]) > 0
    for case, reason in expected.items():
        assert reason in rows[case]["error"] and rows[case]["whole_myocardium_ml"] == ""


def test_a_case_failing_after_it_was_read_is_named_and_the_others_are_predicted(trained, tmp_path, monkeypatch,
                                                                                caplog):
    import engine.predictor

    original = engine.predictor.preprocess_case

    def fails_for_case_0003(volumes, settings, centre=None):
        if volumes.case_id == "case0003":
            raise RuntimeError("resampling ran out of memory")
        return original(volumes, settings, centre)

    monkeypatch.setattr(engine.predictor, "preprocess_case", fails_for_case_0003)
    out = tmp_path / "out"
    assert run_predict(trained, trained / "unlabelled", out) == 1
    assert "case0003: skipped: RuntimeError: resampling ran out of memory" in caplog.text
    rows = {row["case"]: row for row in csv.DictReader(open(out / "volumes.csv"))}
    assert rows["case0003"]["error"] == "RuntimeError: resampling ran out of memory"
    predicted = sorted(path.name for path in out.glob("*.nii.gz"))
    assert "case0003.nii.gz" not in predicted and len(predicted) == len(rows) - 1 >= 2


def test_output_folder_guard_overwrite_and_challenge_label_values(trained, tmp_path, caplog):
    src = tmp_path / "input"
    shutil.copytree(trained / "unlabelled", src)
    for sequence in ("bSSFP", "LGE", "T2w"):
        for path in (src / "Raw_data" / sequence).glob("case000[2-6].nii.gz"):
            path.unlink()
    out = tmp_path / "out"
    assert run_predict(trained, src, out) == 0
    default = np.asarray(nib.load(str(out / "case0001.nii.gz")).dataobj)
    assert run_predict(trained, src, out, "--label_values", "myops2020") == 1
    assert "already holds predictions (case0001.nii.gz, volumes.csv)" in caplog.text
    assert run_predict(trained, src, out, "--label_values", "myops2020", "--overwrite") == 0
    challenge = np.asarray(nib.load(str(out / "case0001.nii.gz")).dataobj)
    np.testing.assert_array_equal(challenge, np.array([0, 200, 2221, 1220])[default])

    (src / "Raw_data" / "T2w" / "case0001.nii.gz").unlink()
    assert run_predict(trained, src, out, "--overwrite") == 1
    assert not (out / "case0001.nii.gz").exists(), "a failed case keeps no prediction of an earlier run"


def test_a_run_without_its_preprocessing_record_is_refused(trained, tmp_path, caplog):
    checkpoint = load_checkpoint(trained / "run" / "last.pth")
    checkpoint["preprocessing"] = None
    checkpoint["args"]["root_path"] = str(tmp_path / "moved_data")
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run" / "last.pth")
    code = predict.main(["--input_dir", str(trained / "unlabelled"), "--output_dir", str(tmp_path / "out"), "--run",
                         str(tmp_path / "run"), "--device", "cpu"])
    assert code == 1
    assert "does not record how its training data was preprocessed" in caplog.text
    assert str(tmp_path / "moved_data" / "dataset.json") in caplog.text
    assert not (tmp_path / "out").exists()


def test_volumes_are_voxel_counts_times_the_voxel_volume():
    mask = np.zeros((10, 8, 3), np.uint8)
    mask[1:6, 1:3, 0] = 1  # 10 voxels of normal myocardium
    mask[2:4, 4:6, 1] = 2  # 4 of scar
    mask[5:8, 5:7, 2] = 3  # 6 of edema
    volumes = prediction.tissue_volumes(mask, (1.5, 1.25, 8.0))  # 15 mm^3 = 0.015 mL per voxel
    assert volumes["normal_myocardium_ml"] == pytest.approx(0.150)
    assert volumes["scar_ml"] == pytest.approx(0.060)
    assert volumes["edema_ml"] == pytest.approx(0.090)
    assert volumes["whole_myocardium_ml"] == pytest.approx(0.300)
    assert volumes["scar_percent"] == pytest.approx(20.0) and volumes["edema_percent"] == pytest.approx(30.0)
    empty = prediction.tissue_volumes(np.zeros_like(mask), (1.0, 1.0, 1.0))
    assert empty["whole_myocardium_ml"] == 0.0 and math.isnan(empty["scar_percent"])


def test_unlabelled_layouts_with_nii_and_nii_gz(tmp_path):
    flat, per_case = tmp_path / "flat", tmp_path / "per_case"
    flat.mkdir()
    for code in ("C0", "DE", "T2"):
        (flat / f"myops_test_201_{code}.nii").touch()
    (flat / "myops_test_202_C0.nii.gz").touch()
    case, incomplete = find_cases(flat, labelled=False)
    assert case.case_id == "myops_test_201" and case.label is None
    assert case.images["LGE"].name == "myops_test_201_DE.nii" and case.images["T2w"].name == "myops_test_201_T2.nii"
    assert incomplete.case_id == "myops_test_202" and not incomplete.images["T2w"].exists(), "reported when loaded"
    (per_case / "Case9001").mkdir(parents=True)
    for code in ("C0", "DE", "T2"):
        (per_case / "Case9001" / f"Case9001_{code}.nii.gz").touch()
    case, = find_cases(per_case, labelled=False)
    assert case.images["LGE"].name == "Case9001_DE.nii.gz" and case.label is None
    with pytest.raises(DataError, match="nor does it hold the MyoPS380 layout's Raw_data/ folder"):
        find_cases(tmp_path)


def test_bf16_on_a_cpu_without_bf16_kernels_is_warned_about_by_train_test_and_predict(trained, tmp_path, monkeypatch,
                                                                                       caplog):
    import networks.inference as inference

    assert inference.cpu_has_bf16_kernels() in (True, False), "this PyTorch tells"
    warning = "bf16 is emulated and several times slower than float32"
    monkeypatch.setattr(inference, "cpu_has_bf16_kernels", lambda: False)
    run = tmp_path / "bf16"
    assert train_tiny_run(trained / "data", trained / "priors.pt", run, "--max_epochs", "1", "--amp", "bf16") == 0
    assert warning in caplog.text, "train.py"
    for name, command in (("test.py", lambda: test_script.main(["--output_dir", str(run), "--checkpoint", "last",
                                                                 "--amp", "bf16", "--no_save_nii"])),
                          ("predict.py", lambda: predict.main(["--input_dir", str(trained / "unlabelled"),
                                                               "--output_dir", str(tmp_path / "predicted"), "--run",
                                                               str(run), "--checkpoint", "last", "--amp", "bf16"]))):
        caplog.clear()
        assert command() == 0
        assert warning in caplog.text, name
    caplog.clear()
    assert test_script.main(["--output_dir", str(run), "--checkpoint", "last", "--amp", "none", "--no_save_nii",
                             "--test_save_dir", str(tmp_path / "float32")]) == 0
    monkeypatch.setattr(inference, "cpu_has_bf16_kernels", lambda: True)
    assert test_script.main(["--output_dir", str(run), "--checkpoint", "last", "--amp", "bf16", "--no_save_nii",
                             "--test_save_dir", str(tmp_path / "native")]) == 0
    assert warning not in caplog.text, "float32, or a CPU with bf16 kernels: no warning"
    inference.warn_if_bf16_is_emulated(torch.device("cuda"), "bf16")
    assert warning not in caplog.text, "a GPU: no warning"
