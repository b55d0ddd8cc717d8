"""One preprocessed input per fold (the fold's cases as its test set), optionally heart-centred by a coarse run per
fold; and reading a fold of a prepared input back."""
import logging
from pathlib import Path

from benchmarks.harness.records import BenchmarkError, read_json, write_json
from benchmarks.harness.split import find_cases, read_split
from datasets.dataset_writer import parse_preprocessing_args, run_preprocessing
from engine.checkpoints import CheckpointError
from engine.predictor import locate_hearts

logger = logging.getLogger("benchmark")


INPUT_FORMAT = "immseg-cv-input/1"


def locate_test_hearts(locator, fold, src, test_cases, centres_file):
    """The fold's test cases located by the fold's coarse run (<locator>/fold<k>), written to ``centres_file``."""
    run_dir = Path(locator) / f"fold{fold}"
    if not run_dir.is_dir():
        raise BenchmarkError(f"--locator {locator} has no run of fold {fold} ({run_dir}): run the coarse variant on "
                             "every fold first")
    config = read_json(run_dir / "config.json", "locator run configuration")
    training_data = Path(config["args"]["root_path"]) / "dataset.json"
    seen = sorted(set(read_json(training_data, "locator training data")["split"]["train"]) & set(test_cases))
    if seen:
        raise BenchmarkError(f"the locator {run_dir} was trained on fold {fold}'s test cases {seen} "
                             f"({training_data}): it must be the coarse run of the same fold")
    try:
        missed = locate_hearts(Path(src).resolve(), run_dir, centres_file, test_cases, checkpoint="last")
    except (CheckpointError, ValueError) as error:
        raise BenchmarkError(f"locating the hearts of fold {fold} failed: {error}") from None
    if missed:
        raise BenchmarkError(f"the locator {run_dir} finds no myocardium in fold {fold}'s cases {missed}")


def prepare(src, split_file, data, spacing, crop_size, extra_flags=(), locator=None):
    """preprocess_data.py once per fold into <data>/fold<k>, the fold's cases as its test set. With ``locator``
    (a folder of one coarse run per fold), crops are centred on the heart: training cases on their label, each
    fold's test cases on the centre its coarse run finds."""
    split = read_split(split_file)
    cases = find_cases(split["dataset"], src)
    in_split = sorted(c for fold in split["folds"] for c in fold)
    if sorted(cases) != in_split:
        raise BenchmarkError(f"the cases under {src} ({len(cases)}) are not those of {split_file} "
                             f"({len(in_split)}): missing {sorted(set(in_split) - set(cases))}, "
                             f"extra {sorted(set(cases) - set(in_split))}")
    data = Path(data)
    setting = {"format": INPUT_FORMAT, "dataset": split["dataset"], "source": str(Path(src).resolve()),
               "folds": split["folds"], "preprocess_flags": ["--spacing", f"{spacing:g}", "--crop_size",
                                                             str(crop_size), *extra_flags]}
    if locator is not None:
        setting["locator"] = str(Path(locator).resolve())
        setting["preprocess_flags"] += ["--crop_centre", "heart"]
    marker = data / "benchmark_input.json"
    if marker.exists() and read_json(marker, "input description") != setting:
        raise BenchmarkError(f"{data} was prepared from another split or with other settings ({marker}); "
                             "name another --data folder for this input setting")
    if not marker.exists():
        if data.exists() and any(data.iterdir()):
            raise BenchmarkError(f"{data} exists and is not a folder made by this benchmark's prepare step")
        write_json(marker, setting)
    for fold, test_cases in enumerate(split["folds"]):
        fold_dir = data / f"fold{fold}"
        if (fold_dir / "dataset.json").is_file():
            logger.info("%s already prepared", fold_dir)
            continue
        fold_split = data / "splits" / f"fold{fold}.json"
        write_json(fold_split, {"test": test_cases, "val": []})
        fold_flags = list(setting["preprocess_flags"])
        if locator is not None:
            centres_file = data / "centres" / f"fold{fold}.json"
            centres_file.parent.mkdir(parents=True, exist_ok=True)
            locate_test_hearts(locator, fold, src, test_cases, centres_file)
            fold_flags += ["--heart_centres", str(centres_file)]
        code = run_preprocessing(parse_preprocessing_args([
            "--dataset", split["dataset"], "--src_path", str(Path(src).resolve()), "--dst_path", str(fold_dir),
            "--split_file", str(fold_split), *fold_flags]))
        if code != 0:
            raise BenchmarkError(f"preprocess_data.py failed for fold {fold} (exit {code})")
    return setting


def read_input(data, fold):
    marker = Path(data) / "benchmark_input.json"
    setting = read_json(marker, "input description")
    if setting.get("format") != INPUT_FORMAT:
        raise BenchmarkError(f"{marker} is not an input description of this benchmark; run prepare first")
    if not 0 <= fold < len(setting["folds"]):
        raise BenchmarkError(f"--fold {fold}: {data} has folds 0 to {len(setting['folds']) - 1}")
    fold_dir = Path(data) / f"fold{fold}"
    dataset = read_json(fold_dir / "dataset.json", "preprocessed fold")
    if sorted(dataset["split"]["test"]) != sorted(setting["folds"][fold]):
        raise BenchmarkError(f"{fold_dir}'s test cases are not fold {fold} of {marker}; prepare it again")
    return setting, fold_dir, dataset
