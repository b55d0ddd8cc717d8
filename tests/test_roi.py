"""Region of interest (issue 13): crops around the heart, the coarse locator, and the way back to the original grid."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import locate_heart
import predict
import preprocess_data
from datasets import dataset_writer
import test as test_script
from engine import evaluation
from benchmarks import myops2020 as benchmark
from conftest import train_tiny_run, write_test_priors
from datasets.dataset_myops import MyoPSDataset
from datasets.geometry import plan_geometry, probabilities_to_original, to_original, to_processed
from datasets.layouts import DataError, load_case
from datasets.phantom import write_phantom
from datasets.roi import CENTRES_FORMAT, heart_centre, read_centres, write_centres


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 1.0 if not a.any() and not b.any() else 2 * (a & b).sum() / (a.sum() + b.sum())


def ring(shape, centre, radius=(6, 10)):
    """A myocardial ring (label 1) with a scar patch (label 2) around ``centre`` on every slice."""
    x, y = np.ogrid[:shape[0], :shape[1]]
    distance = np.hypot(x - centre[0], y - centre[1])
    label = np.zeros(shape, np.uint8)
    label[(distance >= radius[0]) & (distance <= radius[1])] = 1
    label[(distance >= radius[0]) & (distance <= radius[1]) & (x < centre[0] - 4)] = 2
    return label


def test_a_crop_around_a_centre_puts_it_in_the_middle():
    marked = np.zeros((97, 83, 1), np.uint8)
    marked[70, 12] = 1
    geometry = plan_geometry(marked.shape, (1.0, 1.0, 8.0), np.eye(4), None, 31, centre=(70, 12))
    processed = to_processed(marked, geometry, order=0)
    assert list(zip(*np.nonzero(processed[..., 0]))) == [(15, 15)], "the centre's pixel is the crop's middle pixel"

    marked[71, 13] = marked[70, 13] = marked[71, 12] = 1  # a 2x2 block centred on (70.5, 12.5), halved in size
    geometry = plan_geometry(marked.shape, (0.7, 0.7, 8.0), np.eye(4), 1.4, 31, centre=(70.5, 12.5))
    assert to_processed(marked, geometry, order=0)[15, 15, 0] == 1

    generator = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(s) for s in generator.integers(40, 200, 2)) + (2,)
        spacing = float(generator.uniform(0.6, 2.0))
        target, crop = float(generator.uniform(0.8, 2.0)), int(generator.integers(16, 96))
        centre = tuple(float(generator.uniform(0, shape[a] - 1)) for a in range(2))
        geometry = plan_geometry(shape, (spacing, spacing, 8.0), np.eye(4), target, crop, centre=centre)
        for a in range(2):
            on_resampled_grid = (centre[a] + 0.5) * geometry.resampled_shape[a] / shape[a] - 0.5
            assert abs(geometry.crop_start[a] + (crop - 1) / 2 - on_resampled_grid) <= 0.5


def test_an_off_centre_heart_survives_the_round_trip_that_an_image_centred_crop_loses():
    label = ring((120, 100, 3), (88, 24))
    centre = heart_centre(label)
    image_centred = plan_geometry(label.shape, (1.0, 1.0, 8.0), np.eye(4), None, 40)
    assert to_processed(label, image_centred, order=0).sum() == 0, "the heart lies outside the image-centred crop"
    geometry = plan_geometry(label.shape, (1.0, 1.0, 8.0), np.eye(4), None, 40, centre=centre)
    np.testing.assert_array_equal(to_original(to_processed(label, geometry, order=0), geometry, order=0), label)
    geometry = plan_geometry(label.shape, (0.8, 0.8, 8.0), np.eye(4), 1.2, 40, centre=centre)
    restored = to_original(to_processed(label, geometry, order=0), geometry, order=0)
    assert dice(restored == 1, label == 1) > 0.85 and dice(restored == 2, label == 2) > 0.8


def test_a_crop_over_the_border_is_padded_and_maps_back():
    label = ring((120, 100, 2), (9, 92), radius=(3, 6))
    geometry = plan_geometry(label.shape, (1.0, 1.0, 8.0), np.eye(4), None, 40, centre=heart_centre(label))
    assert geometry.crop_start[0] < 0 and geometry.crop_start[1] + 40 > 100
    image = np.arange(120 * 100 * 2, dtype=np.float32).reshape(label.shape) + 1
    processed = to_processed(image, geometry, order=0, fill=np.nan)
    rows, columns = -geometry.crop_start[0], 100 - geometry.crop_start[1]  # where the volume begins and ends
    assert np.isnan(processed[:rows]).all() and np.isnan(processed[:, columns:]).all()
    assert not np.isnan(processed[rows:, :columns]).any()
    np.testing.assert_array_equal(to_original(to_processed(label, geometry, order=0), geometry, order=0), label)


def test_heart_centre_is_the_middle_of_the_bounding_box_of_the_largest_heart():
    label = np.zeros((60, 50, 4), np.uint8)
    label[10:21, 30:42, 1:3] = 1
    label[12:15, 32:35, 1] = 2
    label[18:23, 35:39, 2] = 3  # edema reaches row 22: part of the heart
    assert heart_centre(label) == (16.0, 35.5)
    label[55, 2, 0] = 1  # a stray false positive far from the heart
    assert heart_centre(label) == (32.5, 21.5)
    assert heart_centre(label, largest_component=True) == (16.0, 35.5)
    assert heart_centre(np.zeros((8, 8, 2), np.uint8)) is None
    assert heart_centre(np.zeros((8, 8, 2), np.uint8), largest_component=True) is None


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not readable JSON"),
    (json.dumps({"format": "something else", "centres": {}}), "is not a heart centres file"),
    (json.dumps({"format": CENTRES_FORMAT, "centres": [[1, 2]]}), "is not a heart centres file"),
    (json.dumps({"format": CENTRES_FORMAT, "centres": {"case0001": [3.0]}}), "the centre of case0001"),
    (json.dumps({"format": CENTRES_FORMAT, "centres": {"case0001": ["3", 4]}}), "the centre of case0001"),
])
def test_a_bad_centres_file_is_named(tmp_path, content, message):
    path = tmp_path / "centres.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_centres(path)
    assert str(path) in str(error.value)


def test_centres_file_round_trip(tmp_path):
    write_centres(tmp_path / "centres.json", {"b": (1.0, 2.5), "a": (np.float64(3.25), 4)}, "by hand")
    assert read_centres(tmp_path / "centres.json") == {"a": (3.25, 4.0), "b": (1.0, 2.5)}
    assert [p.name for p in tmp_path.iterdir()] == ["centres.json"], "no temporaries left"


# On the phantom: a coarse run, the centres it finds, heart-centred data and a run trained on it.
HEART_FLAGS = ["--spacing", "0", "--crop_size", "64", "--crop_centre", "heart"]  # spacing kept: crop only, exact


def preprocess(src, dst, *extra):
    return preprocess_data.main(["--dataset", "Phantom", "--src_path", str(src), "--dst_path", str(dst), *extra])


def train(root, data, run, *extra):
    return train_tiny_run(data, root / "priors.pt", run, *extra)


@pytest.fixture(scope="module")
def phantom_runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("roi")
    write_phantom(root / "raw", cases=6, seed=8)
    write_test_priors(root)
    assert preprocess(root / "raw", root / "coarse_data", "--spacing", "2.0", "--crop_size", "64",
                      "--test_every", "3") == 0
    assert train(root, root / "coarse_data", root / "coarse", "--max_epochs", "1") == 0
    test_cases = json.loads((root / "coarse_data" / "dataset.json").read_text())["split"]["test"]
    assert locate_heart.main(["--input_dir", str(root / "raw"), "--run", str(root / "coarse"), "--output",
                              str(root / "centres.json"), "--device", "cpu", "--cases", *test_cases]) == 0
    assert preprocess(root / "raw", root / "heart_data", *HEART_FLAGS, "--test_every", "3", "--heart_centres",
                      str(root / "centres.json")) == 0
    # two epochs at a higher rate: the fine model must find some myocardium for predict.py to be compared with test.py
    assert train(root, root / "heart_data", root / "heart", "--max_epochs", "2", "--base_lr", "0.01") == 0
    yield root
    torch.set_num_threads(threads)


def phantom_case(root, case_id):
    finder, label_map, _ = dataset_writer.DATASETS["Phantom"]
    case, = [case for case in finder(root / "raw") if case.case_id == case_id]
    return load_case(case, label_map)


def test_locate_heart_writes_the_test_cases_centres_and_refuses_a_heart_centred_locator(phantom_runs, caplog):
    root = phantom_runs
    record = json.loads((root / "centres.json").read_text())
    assert record["format"] == CENTRES_FORMAT and "coarse" in record["source"]
    test_cases = json.loads((root / "coarse_data" / "dataset.json").read_text())["split"]["test"]
    assert sorted(record["centres"]) == sorted(test_cases)
    for case, centre in read_centres(root / "centres.json").items():
        volumes = phantom_case(root, case)
        truth = heart_centre(volumes.label)
        assert all(0 <= centre[a] < volumes.label.shape[a] for a in range(2))
        assert np.hypot(*np.subtract(centre, truth)) * volumes.spacing[0] < 40, (case, centre, truth, "mm")

    assert locate_heart.main(["--input_dir", str(root / "raw"), "--run", str(root / "heart"), "--output",
                              str(root / "refused.json"), "--device", "cpu"]) == 1
    assert "trained on heart-centred crops" in caplog.text and not (root / "refused.json").exists()


def test_training_cases_are_centred_on_their_label_and_test_cases_on_the_centres_file(phantom_runs):
    root = phantom_runs
    info = json.loads((root / "heart_data" / "dataset.json").read_text())
    assert info["settings"]["crop_centre"] == "heart"
    assert info["settings"]["heart_centres"] == str((root / "centres.json").resolve())
    located = read_centres(root / "centres.json")
    assert sorted(info["crop_centres"]) == sorted(info["split"]["train"] + info["split"]["test"])
    for case in info["split"]["train"]:
        assert info["crop_centres"][case] == {"centre": list(heart_centre(phantom_case(root, case).label)),
                                              "source": "label"}
    dataset = MyoPSDataset(root / "heart_data", split="test_vol")
    assert len(dataset) == len(info["split"]["test"]) > 0
    for index in range(len(dataset)):
        volume = dataset[index]
        case = volume["case_name"]
        assert info["crop_centres"][case] == {"centre": list(located[case]), "source": str(root / "centres.json")}
        assert volume["meta"]["crop_centre_source"] == str(root / "centres.json")
        volumes = phantom_case(root, case)
        assert volume["geometry"] == plan_geometry(volumes.label.shape, volumes.spacing, volumes.affine, None, 64,
                                                   centre=located[case])


def test_a_case_without_a_centre_is_refused_before_anything_is_written(phantom_runs, tmp_path, caplog):
    root = phantom_runs
    centres = read_centres(root / "centres.json")
    dropped = sorted(centres)[0]
    write_centres(tmp_path / "partial.json", {c: v for c, v in centres.items() if c != dropped}, "by hand")
    dst = tmp_path / "previous"
    shutil.copytree(root / "heart_data", dst)
    before = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert preprocess(root / "raw", dst, *HEART_FLAGS, "--test_every", "3", "--heart_centres",
                      str(tmp_path / "partial.json")) == 1
    assert dropped in caplog.text and "partial.json" in caplog.text
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.json", "previous"]

    write_centres(tmp_path / "outside.json", {**centres, dropped: (centres[dropped][0], 900.0)}, "by hand")
    assert preprocess(root / "raw", dst, *HEART_FLAGS, "--test_every", "3", "--heart_centres",
                      str(tmp_path / "outside.json")) == 1
    assert f"{dropped}: its centre [{centres[dropped][0]}, 900.0] in {tmp_path / 'outside.json'} lies outside" \
        in caplog.text
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before

    assert preprocess(root / "raw", tmp_path / "image", "--heart_centres", str(root / "centres.json")) == 1
    assert "--heart_centres goes with --crop_centre heart" in caplog.text and not (tmp_path / "image").exists()


def test_test_py_scores_a_heart_centred_dataset_in_the_original_space(phantom_runs, tmp_path, caplog):
    root = phantom_runs
    for volume in MyoPSDataset(root / "heart_data", split="test_vol"):
        reference = evaluation.reference_in_original_space(volume)
        assert all(volume["geometry"].crop_size[a] < reference.shape[a] for a in range(2)), "a crop, not the image"
        perfect = torch.nn.functional.one_hot(volume["label"].long(), 4).permute(3, 0, 1, 2).float().numpy()
        np.testing.assert_array_equal(probabilities_to_original(perfect, volume["geometry"]), reference)

    assert test_script.main(["--output_dir", str(root / "heart"), "--checkpoint", "last", "--test_save_dir",
                             str(tmp_path), "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "test_info.json").read_text())
    assert set(info["space"].values()) == {"original"}
    assert test_script.main(["--output_dir", str(root / "coarse"), "--root_path", str(root / "heart_data"),
                             "--test_save_dir", str(tmp_path / "mismatch"), "--device", "cpu"]) == 1
    assert "crop_centre: 'image' in the training data, 'heart' here" in caplog.text
    for case in info["space"]:
        exported = nib.load(str(tmp_path / f"{case}_pred.nii.gz"))
        source = nib.load(str(root / "raw" / "Raw_data" / "label" / f"{case}_gt.nii.gz"))
        assert exported.shape == source.shape
        np.testing.assert_allclose(exported.affine, source.affine)


def test_predict_with_a_heart_centred_run_needs_the_locator_and_matches_test_py(phantom_runs, tmp_path, caplog):
    root = phantom_runs
    unlabelled = tmp_path / "unlabelled"
    for sequence in ("bSSFP", "LGE", "T2w"):
        shutil.copytree(root / "raw" / "Raw_data" / sequence, unlabelled / "Raw_data" / sequence)

    def run_predict(run, out, *extra):
        return predict.main(["--input_dir", str(unlabelled), "--output_dir", str(out), "--run", str(run),
                             "--checkpoint", "last", "--device", "cpu", *extra])

    assert run_predict(root / "heart", tmp_path / "refused") == 1
    assert "give --locator_run" in caplog.text and not (tmp_path / "refused").exists()
    assert run_predict(root / "coarse", tmp_path / "refused", "--locator_run", str(root / "coarse")) == 1
    assert "needs no heart locator" in caplog.text and not (tmp_path / "refused").exists()

    out = tmp_path / "predicted"
    assert run_predict(root / "heart", out, "--locator_run", str(root / "coarse")) == 0
    evaluation = tmp_path / "evaluation"
    assert test_script.main(["--output_dir", str(root / "heart"), "--checkpoint", "last", "--test_save_dir",
                             str(evaluation), "--device", "cpu"]) == 0
    test_cases = json.loads((root / "heart_data" / "dataset.json").read_text())["split"]["test"]
    for case in sorted(p.name[:-len(".nii.gz")] for p in (unlabelled / "Raw_data" / "LGE").iterdir()):
        source = nib.load(str(unlabelled / "Raw_data" / "LGE" / f"{case}.nii.gz"))
        prediction = nib.load(str(out / f"{case}.nii.gz"))
        assert prediction.shape == source.shape
        np.testing.assert_array_equal(prediction.affine, source.affine)
        if case in test_cases:  # located by the same coarse run: the same crop as the preprocessed test case
            expected = np.asarray(nib.load(str(evaluation / f"{case}_pred.nii.gz")).dataobj)
            assert expected.any(), "the fine model finds some myocardium"
            np.testing.assert_array_equal(np.asarray(prediction.dataobj), expected)


def test_benchmark_prepare_with_a_locator_writes_centres_and_heart_centred_folds(phantom_runs, tmp_path, caplog):
    root = phantom_runs
    assert benchmark.main(["split", "--dataset", "Phantom", "--src", str(root / "raw"), "--split_file",
                           str(tmp_path / "split.json")]) == 0
    prepare = ["prepare", "--src", str(root / "raw"), "--split_file", str(tmp_path / "split.json"), "--data",
               str(tmp_path / "data"), "--spacing", "2.0", "--crop_size", "64", "--locator", str(tmp_path / "locator")]
    (tmp_path / "locator").mkdir()
    assert benchmark.main(prepare) == 1
    assert "has no run of fold 0" in caplog.text
    shutil.rmtree(tmp_path / "data")
    folds = json.loads((tmp_path / "split.json").read_text())["folds"]
    for fold in range(len(folds)):  # a coarse run trained on other cases than the folds' training cases
        shutil.copytree(root / "coarse", tmp_path / "locator" / f"fold{fold}")
    assert benchmark.main(prepare) == 1
    assert "was trained on fold 0's test cases" in caplog.text
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / "locator")
    assert benchmark.main(prepare[:-2] + ["--data", str(tmp_path / "coarse_data")]) == 0
    for fold in range(len(folds)):  # each fold's own coarse run
        assert train(root, tmp_path / "coarse_data" / f"fold{fold}", tmp_path / "locator" / f"fold{fold}",
                     "--max_epochs", "1") == 0
    assert benchmark.main(prepare) == 0
    assert json.loads((tmp_path / "data" / "benchmark_input.json").read_text())["locator"] == str(
        (tmp_path / "locator").resolve())
    for fold, test_cases in enumerate(folds):
        centres_file = tmp_path / "data" / "centres" / f"fold{fold}.json"
        assert sorted(read_centres(centres_file)) == sorted(test_cases)
        info = json.loads((tmp_path / "data" / f"fold{fold}" / "dataset.json").read_text())
        assert info["settings"]["crop_centre"] == "heart" and info["settings"]["heart_centres"] == str(
            centres_file.resolve())
        assert {case: entry["source"] for case, entry in info["crop_centres"].items()} == {
            case: str(centres_file) if case in test_cases else "label" for case in sum(folds, [])}
