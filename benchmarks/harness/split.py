"""The benchmark's cross-validation split: a seeded k-fold split of the case ids, written once and reused."""
import logging
from pathlib import Path

import numpy as np

from benchmarks.harness.records import BenchmarkError, read_json, write_json
from datasets.dataset_writer import DATASETS as PREPROCESSING_DATASETS

logger = logging.getLogger("benchmark")


SPLIT_FORMAT = "immseg-cv-split/1"


def make_folds(case_ids, folds=3, seed=1234):
    """Test cases of each fold: a seeded permutation of the sorted ids dealt out in turn, each fold sorted."""
    case_ids = sorted(case_ids)
    if len(case_ids) < folds:
        raise BenchmarkError(f"{len(case_ids)} cases cannot be split into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    return [sorted(case_ids[i] for i in order[k::folds]) for k in range(folds)]


def find_cases(dataset, src):
    finder = PREPROCESSING_DATASETS[dataset][0]
    return [case.case_id for case in finder(src)]


def write_split(dataset, src, split_file, folds, seed):
    """The split file; an existing one is reused when it holds the same folds, refused otherwise."""
    split = {"format": SPLIT_FORMAT, "dataset": dataset, "source": str(Path(src).resolve()), "seed": seed,
             "folds": make_folds(find_cases(dataset, src), folds, seed)}
    split_file = Path(split_file)
    if split_file.exists():
        existing = read_json(split_file, "split file")
        if existing.get("folds") != split["folds"]:
            raise BenchmarkError(f"{split_file} holds another split ({len(existing.get('folds') or [])} folds, "
                                 f"seed {existing.get('seed')}); results made with it would no longer match: "
                                 "choose another --split_file")
        logger.info("%s already holds this split: reused", split_file)
        return existing
    write_json(split_file, split)
    logger.info("%d cases in %d folds (seed %d) -> %s", sum(map(len, split["folds"])), folds, seed, split_file)
    return split


def read_split(split_file):
    split = read_json(split_file, "split file")
    if split.get("format") != SPLIT_FORMAT or not split.get("folds"):
        raise BenchmarkError(f"{split_file} is not a split file of this benchmark (format {SPLIT_FORMAT})")
    return split
