"""nnU-Net v2 rows of the MyoPS 2020 benchmark: the folds, wall-clock budget and scoring of benchmarks/myops2020.py.

    python benchmarks/nnunet_myops2020.py --data data/myops2020_1mm_176 --out runs/myops2020_benchmark \
        --variant nnunet_own --fold 0 --budget_minutes 42

nnunet_own: nnU-Net plans and preprocesses the raw cases of the input's source folder itself (labels mapped to
0-3, the three sequences as channels 0000-0002 in the project's order). nnunet_ours: nnU-Net plans on the
fold's preprocessed volumes (training slices stacked back into volumes, the processed spacing), and its test
probabilities are mapped back to the original geometry as test.py maps ours. Both train nnU-Net's 2d
configuration with nnUNetTrainerWallClock (benchmarks/nnunet_trainer/: nnU-Net's trainer, shortened to
--budget_minutes after timing its first iterations) on our fold's training cases (splits_final.json holds our folds),
take the final checkpoint's predictions of our fold's test cases from nnU-Net's final validation, score them in
the original image space against the raw label (utils.case_metrics, original spacing) and append the per-case
records to <out>/results.jsonl, where `python benchmarks/myops2020.py report` shows them.

nnU-Net runs through its own command-line tools, in an environment of its own (--nnunet_venv), never the
project's: python3 -m venv .venv-nnunet && .venv-nnunet/bin/pip install -r benchmarks/requirements-nnunet.txt.
Its folders are under <out>/nnunet/<input>/<variant>[/fold<k>]. A (variant, fold) already in the results is
skipped; a training that did not finish starts over.
"""
import argparse
import datetime
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets import dataset_writer  # noqa: E402
from benchmarks.harness.prepare import read_input  # noqa: E402
from benchmarks.harness.records import (BenchmarkError, append_results, defined, locked,  # noqa: E402
                                        machine_description, read_json, read_results, run_key, write_json)
from benchmarks.harness.variants import setting_label  # noqa: E402
from benchmarks.nnunet_trainer import nnunet_budget  # noqa: E402
from datasets.geometry import CaseGeometry, plan_geometry, probabilities_to_original  # noqa: E402
from datasets.layouts import load_case  # noqa: E402
from datasets.vocabulary import CLASS_NAMES, MODALITIES  # noqa: E402
from engine.runs import configure_logging, git_commit  # noqa: E402
from utils import case_metrics  # noqa: E402

logger = logging.getLogger("benchmark.nnunet")

VARIANTS = {"nnunet_own": "nnU-Net v2 2d, its own planning from the raw cases",
            "nnunet_ours": "nnU-Net v2 2d on our preprocessed input"}
DATASET_ID = 1
DATASET = f"Dataset{DATASET_ID:03d}_MyoPS"
CONFIGURATION = "2d"
PLANS = "nnUNetPlans"
TRAINER = "nnUNetTrainerWallClock"
TRAINER_FOLDER = ROOT / "benchmarks" / "nnunet_trainer"
FILE_ENDING = ".nii.gz"


# ---------------------------------------------------------------------------------------------- nnU-Net's layout
def nnunet_root(out, input_name, variant, fold):
    """nnU-Net's raw, preprocessed and results folders of a run: one for all folds of nnunet_own (the raw cases
    are the same), one per fold for nnunet_ours (each fold is preprocessed apart)."""
    root = Path(out).resolve() / "nnunet" / input_name / variant
    return root if variant == "nnunet_own" else root / f"fold{fold}"


def results_folder(root, label):
    """nnU-Net's results folder of one budget (nnUNet_results): a run with another budget trains anew."""
    return root / "results" / label.replace(" ", "_")


def fold_output(root, label, fold):
    return results_folder(root, label) / DATASET / f"{TRAINER}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}"


def dataset_description(case_count, description):
    """nnU-Net's dataset.json: the sequences as channels in the project's order, the classes 0-3."""
    return {"channel_names": {str(index): modality for index, modality in enumerate(MODALITIES)},
            "labels": {name: index for index, name in enumerate(CLASS_NAMES)},
            "numTraining": case_count, "file_ending": FILE_ENDING, "description": description}


def nnunet_splits(folds):
    """splits_final.json: nnU-Net's fold k trains on our fold k's training cases and validates on its test cases."""
    cases = sorted(case for fold in folds for case in fold)
    return [{"train": sorted(set(cases) - set(test)), "val": sorted(test)} for test in folds]


def _save_nifti(array, affine, path, dtype, header=None):
    image = nib.Nifti1Image(array.astype(dtype), affine, header)
    image.set_data_dtype(dtype)
    nib.save(image, str(path))


def _save_case(folder, case_id, images, label, affine, header=None):
    for index, modality in enumerate(MODALITIES):
        _save_nifti(images[modality], affine, folder / "imagesTr" / f"{case_id}_{index:04d}{FILE_ENDING}", np.float32,
                    header)
    _save_nifti(label, affine, folder / "labelsTr" / f"{case_id}{FILE_ENDING}", np.uint8, header)


def _source_cases(setting):
    """{case id: CaseFiles} of the input's raw source folder, with the raw dataset's label map."""
    finder, label_map, _ = dataset_writer.DATASETS[setting["dataset"]]
    cases = {case.case_id: case for case in finder(setting["source"])}
    expected = sorted(case for fold in setting["folds"] for case in fold)
    missing = sorted(set(expected) - set(cases))
    if missing:
        raise BenchmarkError(f"{setting['source']} no longer holds cases {missing} of the split")
    return {case: cases[case] for case in expected}, label_map


def write_raw_dataset(setting, folder):
    """nnunet_own's input: every raw case (all folds), its sequences on the first one's grid, labels 0-3."""
    cases, label_map = _source_cases(setting)
    for case_id, files in tqdm(cases.items(), desc="raw cases", unit="case"):
        volumes = load_case(files, label_map)
        _save_case(folder, case_id, volumes.images, volumes.label, volumes.affine, volumes.headers[MODALITIES[0]])
    return len(cases)


def _processed_affine(spacing):
    return np.diag([*map(float, spacing), 1.0])


def read_processed_case(fold_dir, case_id, role):
    """A case as preprocess_data.py stored it: ({modality: (C, C, Z)}, label, geometry or None); a training case
    is stacked from its slices (train.txt's order), a test case read from its h5 volumes with their geometry."""
    if role == "train":
        slices = [name for name in (fold_dir / "train.txt").read_text().split()
                  if name.rsplit("_slice", 1)[0] == case_id]
        if not slices:
            raise BenchmarkError(f"{fold_dir / 'train.txt'} lists no slices of training case {case_id}")
        stacked = {}
        for modality in MODALITIES:
            arrays = [np.load(fold_dir / modality / "train_npz" / f"{name}.npz") for name in slices]
            stacked[modality] = {key: np.stack([array[key] for array in arrays], axis=-1)
                                 for key in ("image", "label")}
        images = {modality: arrays["image"] for modality, arrays in stacked.items()}
        return images, stacked[MODALITIES[0]]["label"], None
    images = {}
    for modality in MODALITIES:
        with h5py.File(fold_dir / modality / "test_vol_h5" / f"{case_id}.npy.h5", "r") as handle:
            images[modality] = handle["image"][:]
            label = handle["label"][:]
            geometry = CaseGeometry.from_attrs(handle.attrs)
    return images, label, geometry


def write_processed_dataset(setting, fold_dir, dataset, folder):
    """nnunet_ours' input: every case of the fold's preprocessed folder at its processed spacing."""
    sources, _ = _source_cases(setting)
    settings = dataset["settings"]
    roles = {case: role for role in ("train", "test") for case in dataset["split"][role]}
    for case_id, role in tqdm(sorted(roles.items()), desc="processed cases", unit="case"):
        images, label, geometry = read_processed_case(fold_dir, case_id, role)
        if geometry is None:  # the spacing of the slices: the raw header's, resampled as preprocessing did
            header = nib.load(str(sources[case_id].images[MODALITIES[0]]))
            geometry = plan_geometry(header.shape[:3], header.header.get_zooms()[:3], header.affine,
                                     settings["spacing_mm"], settings["crop_size"])
        _save_case(folder, case_id, images, label, _processed_affine(geometry.processed_spacing))
    return len(roles)


def prepare_raw_folder(variant, setting, fold_dir, dataset, root):
    """nnU-Net's raw dataset folder of the run, written once (into a staging folder moved into place)."""
    folder = root / "raw" / DATASET
    if (folder / "dataset.json").is_file():
        return folder
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "labelsTr").mkdir()
    if variant == "nnunet_own":
        count = write_raw_dataset(setting, staging)
        description = f"raw cases of {setting['source']}"
    else:
        count = write_processed_dataset(setting, fold_dir, dataset, staging)
        description = f"preprocessed cases of {fold_dir}"
    write_json(staging / "dataset.json", dataset_description(count, description))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# ---------------------------------------------------------------------------------------------- nnU-Net's tools
def nnunet_environment(root, label, options):
    environment = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                   "nnUNet_results": str(results_folder(root, label)), "nnUNet_extTrainer": str(TRAINER_FOLDER),
                   "nnUNet_def_n_proc": str(options.processes),
                   **nnunet_budget.budget_environment(options.budget_minutes, options.timed_iterations,
                                                      options.iterations_per_epoch)}
    if options.num_workers is not None:
        environment["nnUNet_n_proc_DA"] = str(options.num_workers)
    return environment


def run_tool(options, tool, arguments, environment, log_path):
    """One of nnU-Net's command-line tools from its environment, its output into log_path."""
    executable = Path(options.nnunet_venv) / "bin" / tool
    if not executable.is_file():
        raise BenchmarkError(
            f"{executable} not found: install nnU-Net in its own environment (python3 -m venv {options.nnunet_venv} "
            f"&& {options.nnunet_venv}/bin/pip install -r benchmarks/requirements-nnunet.txt) or name it with "
            "--nnunet_venv")
    logger.info("%s %s (log: %s)", tool, " ".join(arguments), log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        code = subprocess.run([str(executable), *arguments], env={**os.environ, **environment}, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise BenchmarkError(f"{tool} failed (exit {code}); see {log_path}")


def plan_and_preprocess(options, root, environment, folds):
    """nnU-Net's fingerprint, plans and 2d preprocessing (once per nnU-Net folder), then our folds as its split."""
    preprocessed = root / "preprocessed" / DATASET
    if not (preprocessed / f"{PLANS}.json").is_file() or not (preprocessed / f"{PLANS}_{CONFIGURATION}").is_dir():
        run_tool(options, "nnUNetv2_plan_and_preprocess",
                 ["-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", str(options.processes), "-npfp",
                  str(options.processes), "--verify_dataset_integrity"], environment, root / "plan_and_preprocess.log")
    write_json(preprocessed / "splits_final.json", nnunet_splits(folds))


def train(options, root, label, environment, fold, test_cases):
    """nnUNetv2_train with the wall-clock trainer and its final validation (probabilities kept); returns the
    command's seconds, or None when a finished training and its validation were found."""
    output = fold_output(root, label, fold)
    validated = all((output / "validation" / f"{case}{suffix}").is_file()
                    for case in test_cases for suffix in (FILE_ENDING, ".npz"))
    arguments = [DATASET, CONFIGURATION, str(fold), "-tr", TRAINER, "-p", PLANS, "-device", options.device, "--npz"]
    if (output / "checkpoint_final.pth").is_file():
        record = read_json(output / nnunet_budget.RECORD_FILE, "nnU-Net budget record")
        done = (record["budget_minutes"], record.get("timed_iterations"),  # absent from records of timed epochs
                (record["iterations_per_epoch"], record["val_iterations_per_epoch"]))
        if done != nnunet_budget.budget_settings(environment):
            raise BenchmarkError(f"{output} was trained with other budget settings {done}; remove it to "
                                         "train again")
        if validated:
            return None
        arguments.append("--val")
    else:
        shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    run_tool(options, "nnUNetv2_train", arguments, environment, results_folder(root, label) / f"train_fold{fold}.log")
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- scoring
def read_nnunet_probabilities(path):
    """Probabilities that nnU-Net saved (K, Z, Y, X: its readers' axis order) as (K, X, Y, Z), nibabel's order."""
    with np.load(path) as archive:
        return np.ascontiguousarray(archive["probabilities"].transpose(0, 3, 2, 1))


def predictions_in_original_space(variant, output, fold_dir, test_cases):
    """{case: labels (X, Y, Z) in the original grid} from nnU-Net's final validation of the fold's test cases."""
    predictions = {}
    for case in test_cases:
        segmentation = np.asarray(nib.load(str(output / "validation" / f"{case}{FILE_ENDING}")).dataobj)
        if variant == "nnunet_own":
            predictions[case] = segmentation.astype(np.uint8)
            continue
        probabilities = read_nnunet_probabilities(output / "validation" / f"{case}.npz")
        if not np.array_equal(probabilities.argmax(0), segmentation):
            raise BenchmarkError(f"{output / 'validation' / case}: the saved probabilities do not give "
                                         "nnU-Net's segmentation: their axis order is not the one expected")
        _, _, geometry = read_processed_case(fold_dir, case, "test")
        predictions[case] = probabilities_to_original(probabilities, geometry)
    return predictions


def score(predictions, setting):
    """{case: {structure: (dice, hd95)}} against the raw label mapped to 0-3, at the original spacing."""
    sources, label_map = _source_cases(setting)
    metrics = {}
    for case, prediction in sorted(predictions.items()):
        reference = load_case(sources[case], label_map)
        if prediction.shape != reference.label.shape:
            raise BenchmarkError(f"{case}: prediction of shape {prediction.shape}, but the raw label "
                                         f"{sources[case].label} has shape {reference.label.shape}")
        metrics[case] = case_metrics(prediction, reference.label, reference.spacing)
    return metrics


def make_records(common, metrics):
    return [{**common, "case": case, "structure": structure, "dice": defined(dice),
             "hd95": defined(hd95)}
            for case, per_structure in sorted(metrics.items()) for structure, (dice, hd95) in per_structure.items()]


def run_records(options, input_name, label, budget, command_seconds, metrics):
    """The harness's record format, the nnU-Net run's budget record (wall_clock_budget.json) filling it."""
    common = {"input": input_name, "variant": options.variant, "setting": label, "fold": options.fold,
              "mode": "time", "budget_minutes": options.budget_minutes, "iterations": budget["iterations"],
              "seconds_per_step": budget["seconds_per_iteration"],
              "train_seconds": round(budget["training_seconds"], 1), "max_epochs": budget["epochs"],
              "start_contrast_epoch": None, "region_fusion_start_epoch": None, "vit_name": None,
              "batch_size": budget["batch_size"], "priors": None,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_commit(), "machine": machine_description(options.device),
              "nnunet_version": budget["nnunet_version"],
              "nnunet_configuration": CONFIGURATION,
              "patch_size": budget["patch_size"], "iterations_per_epoch": budget["iterations_per_epoch"],
              "seconds_per_epoch_end": budget["seconds_per_epoch_end"],
              "timed_iterations": budget["timed_iterations"],
              "command_seconds": None if command_seconds is None else round(command_seconds, 1)}
    return make_records(common, metrics)


# ---------------------------------------------------------------------------------------------- run
def run(options):
    setting, fold_dir, dataset = read_input(options.data, options.fold)
    if not options.budget_minutes > 0:
        raise BenchmarkError(f"--budget_minutes {options.budget_minutes} must be positive")
    label = setting_label("time", options.budget_minutes)
    input_name = Path(options.data).resolve().name
    results = Path(options.out) / "results.jsonl"
    key = (input_name, options.variant, label, options.fold)
    if any(run_key(record) == key for record in read_results(results)):
        logger.info("%s fold %d (%s, input %s) is already in %s: skipped", options.variant, options.fold, label,
                    input_name, results)
        return 0
    root = nnunet_root(options.out, input_name, options.variant, options.fold)
    environment = nnunet_environment(root, label, options)
    nnunet_budget.budget_settings(environment)  # the trainer's check, before anything runs
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / "nnunet_input", timeout_s=4 * 3600):  # the folds of nnunet_own share it
        prepare_raw_folder(options.variant, setting, fold_dir, dataset, root)
        plan_and_preprocess(options, root, environment, setting["folds"])
    test_cases = dataset["split"]["test"]
    command_seconds = train(options, root, label, environment, options.fold, test_cases)
    output = fold_output(root, label, options.fold)
    budget = read_json(output / nnunet_budget.RECORD_FILE, "nnU-Net budget record")
    metrics = score(predictions_in_original_space(options.variant, output, fold_dir, test_cases), setting)
    append_results(results, run_records(options, input_name, label, budget, command_seconds, metrics))
    logger.info("%s fold %d: %d cases, %d iterations in %d epochs of up to %d in %.0f s of training (budget: %s) "
                "-> %s", options.variant, options.fold, len(metrics), budget["iterations"], budget["epochs"],
                budget["iterations_per_epoch"], budget["training_seconds"], label, results)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder written by myops2020.py prepare")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder: results.jsonl, nnunet/")
    parser.add_argument("--variant", required=True, choices=list(VARIANTS),
                        help="; ".join(f"{name}: {text}" for name, text in VARIANTS.items()))
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--budget_minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--nnunet_venv", type=Path, default=ROOT / ".venv-nnunet",
                        help="environment with nnU-Net (benchmarks/requirements-nnunet.txt); default: .venv-nnunet "
                             "in the repository")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="nnUNetv2_train -device")
    parser.add_argument("--processes", type=int, default=2,
                        help="nnU-Net's processes for planning, preprocessing and exporting predictions")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="nnU-Net's augmentation processes (nnUNet_n_proc_DA; default: nnU-Net's choice)")
    parser.add_argument("--timed_iterations", type=int, default=nnunet_budget.DEFAULT_TIMED_ITERATIONS,
                        help="training iterations timed before the budget is fitted")
    parser.add_argument("--iterations_per_epoch", type=int, default=None,
                        help="shorter epochs than nnU-Net's 250 iterations, for smoke tests only")
    return parser.parse_args(argv)


def main(argv=None):
    configure_logging()
    options = parse_args(argv)
    try:
        return run(options)
    except (ValueError, FileNotFoundError) as error:  # the project's errors name the cause
        logger.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
