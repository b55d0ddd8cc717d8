"""Writing a preprocessed dataset folder as preprocess_data.py does (its flags, the split, each case's slices or
volumes, the record in dataset.json), staged so that an error leaves the destination as it was."""
import argparse
import io
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from datasets.layouts import DataError, find_myops2020_cases, find_myops380_cases, load_case
from datasets.preprocessing import PreprocessingSettings, preprocess_case
from datasets.preprocessing_record import RECORD_FORMAT, write_record
from datasets.roi import CROP_CENTRES, heart_centre, read_centres
from datasets.vocabulary import CLASS_NAMES, LABEL_MAPS, MODALITIES, dataset_name
from utils import process_alive

logger = logging.getLogger("preprocess")

DATASETS = {
    # name: (case finder, label map, default in-plane spacing in mm)
    "MyoPS380": (find_myops380_cases, LABEL_MAPS["MyoPS380"], 1.0),
    "MyoPS2020": (find_myops2020_cases, LABEL_MAPS["MyoPS2020"], 1.4),
    "Phantom": (find_myops380_cases, LABEL_MAPS["MyoPS380"], 1.0),
}


def preprocessing_parser(description=__doc__):
    """preprocess_data.py's flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, type=dataset_name("MyoPS380"), choices=sorted(DATASETS),
                        help="MyoPS380 (also read as Myops, train.py's name), MyoPS2020 or Phantom")
    parser.add_argument("--src_path", type=Path, required=True, help="raw dataset folder")
    parser.add_argument("--dst_path", type=Path, required=True, help="preprocessed output folder")
    parser.add_argument("--spacing", type=float, default=None,
                        help="in-plane target spacing in mm (default: 1.0 for MyoPS380 and Phantom, 1.4 for "
                             "MyoPS2020, whose myocardium reaches 84 mm from the image centre); 0 keeps the spacing")
    parser.add_argument("--crop_size", type=int, default=128, help="field of view in pixels after resampling")
    parser.add_argument("--crop_centre", default="image", choices=list(CROP_CENTRES),
                        help="image (default): crop around the image centre; heart: around the heart, for a fine "
                             "region of interest (training cases: their label's; others: --heart_centres)")
    parser.add_argument("--heart_centres", type=Path, default=None,
                        help="with --crop_centre heart: centres file of locate_heart.py; required for every "
                             "validation and test case, used for training cases listed in it")
    parser.add_argument("--intensity", default="percentile", choices=["percentile", "released"],
                        help="percentile (default): map --percentiles of each sequence's field of view to 0 and 1, "
                             "for raw scanner ranges; released: clip to [0, 255] and divide by 255, as the review "
                             "release does for MyoPS380, whose released volumes are already scaled to [0, 255]")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5),
                        help="with --intensity percentile: the percentiles mapped to 0 and 1")
    parser.add_argument("--test_every", type=int, default=5,
                        help="test cases: the first case in sorted order and every N-th after it (sorted index "
                             "0, N, 2N, ...), the released split for N = 5; 0: none; 1: all (evaluation only)")
    parser.add_argument("--split_file", type=Path, default=None,
                        help='JSON {"test": [...], "val": [...]} overriding --test_every and --val_fraction')
    parser.add_argument("--val_fraction", type=float, default=0.0,
                        help="fraction of the non-test cases held out for validation (val.txt)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the validation draw and of the phantom")
    parser.add_argument("--phantom_cases", type=int, default=24,
                        help="with --dataset Phantom: cases generated into --src_path if it holds none")
    return parser


def parse_preprocessing_args(argv=None, description=__doc__):
    return preprocessing_parser(description).parse_args(argv)


def split_cases(case_ids, test_every=5, val_fraction=0.0, seed=1234, split_file=None):
    """Deterministic train / val / test split of sorted case ids.

    Test cases are ``sorted(case_ids)[::test_every]``, as the review release's ``filenames[0:380:5]``
    (for MyoPS380: case0001, case0006, ..., case0376).
    """
    case_ids = sorted(case_ids)
    if split_file is not None:
        try:
            spec = json.loads(Path(split_file).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"split file {split_file} is not readable JSON: {error}") from None
        test, val = sorted(spec.get("test", [])), sorted(spec.get("val", []))
        unknown = sorted(set(test + val) - set(case_ids))
        if unknown:
            raise DataError(f"split file {split_file} names cases that are not in the source: {unknown}")
        if set(test) & set(val):
            raise DataError(f"split file {split_file} puts cases in both test and val: {sorted(set(test) & set(val))}")
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"--val_fraction must be in [0, 1), got {val_fraction}")
        if test_every < 0:
            raise DataError(f"--test_every must be 0 or positive, got {test_every}")
        test = case_ids[::test_every] if test_every else []
        rest = [c for c in case_ids if c not in test]
        order = np.random.default_rng(seed).permutation(len(rest))
        val = sorted(rest[i] for i in order[:int(round(val_fraction * len(rest)))])
    train = [c for c in case_ids if c not in set(test) | set(val)]
    return {"train": train, "val": val, "test": test}


def intensity_settings(args):
    """The intensity scaling as recorded in dataset.json and in each volume's attributes."""
    if args.intensity == "released":
        return {"intensity": "released"}
    return {"intensity": "percentile", "percentiles": list(args.percentiles)}


def write_npz(path, **arrays):
    """np.savez without timestamps, so that a rerun writes identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def write_volume(path, image, label, attrs):
    with h5py.File(path, "w", track_order=True) as handle:
        handle.create_dataset("image", data=image, compression="gzip", compression_opts=4, track_times=False)
        handle.create_dataset("label", data=label, compression="gzip", compression_opts=4, track_times=False)
        for key, value in attrs.items():
            handle.attrs[key] = value


def crop_centre_of(volumes, role, centres, args):
    """(centre, where it comes from) of a case's crop: none for the image centre; with the heart crop centre the
    centres file's, else (training cases only) the label's."""
    if args.crop_centre == "image":
        return None, "image centre"
    if volumes.case_id in centres:
        centre, shape = centres[volumes.case_id], next(iter(volumes.images.values())).shape
        if not all(0 <= centre[a] <= shape[a] - 1 for a in range(2)):
            raise DataError(f"{volumes.case_id}: its centre {list(centre)} in {args.heart_centres} lies outside the "
                            f"image ({shape[0]} x {shape[1]} voxels); was the file written for other images?")
        return centre, str(args.heart_centres)
    centre = heart_centre(volumes.label) if role == "train" else None
    if centre is None:
        reason = "its label has no myocardium" if role == "train" else "it is not in --heart_centres"
        raise DataError(f"{volumes.case_id} ({role}) has no heart centre: {reason}; "
                        "give it in a centres file of locate_heart.py")
    return centre, "label"


def process_case(case, label_map, args, spacing, role, staging, centres):
    """Write one case's slices (training) or volumes (validation / test); return its counts and crop centre."""
    settings = PreprocessingSettings(spacing, args.crop_size, tuple(args.percentiles), args.intensity,
                                     args.crop_centre)
    volumes = load_case(case, label_map)
    centre, centre_source = crop_centre_of(volumes, role, centres, args)
    prepared = preprocess_case(volumes, settings, centre)
    processed, label, geometry, ranges = prepared.images, prepared.label, prepared.geometry, prepared.intensity_ranges
    for modality in MODALITIES:
        if role == "train":
            folder = staging / modality / "train_npz"
            for z in range(label.shape[2]):
                write_npz(folder / f"{case.case_id}_slice{z:03d}.npz", image=processed[modality][..., z],
                          label=label[..., z])
        else:
            attrs = {"case": case.case_id, "modality": modality, "source_image": str(case.images[modality]),
                     "source_label": str(case.label), "intensity_range": np.asarray(ranges[modality]),
                     "label_map": json.dumps(label_map), "crop_centre_source": centre_source,
                     **intensity_settings(args), **geometry.to_attrs()}
            write_volume(staging / modality / "test_vol_h5" / f"{case.case_id}.npy.h5",
                         processed[modality], label, attrs)
    return label.shape[2], np.bincount(label.ravel(), minlength=len(CLASS_NAMES)), {
        "centre": None if centre is None else [round(v, 2) for v in centre], "source": centre_source}


def _previous_output(dst, record):
    """Relative paths of the files and folders that the preprocessing recorded in dst/dataset.json wrote."""
    def listed(name):
        return (dst / name).read_text().split() if (dst / name).is_file() else []

    paths = {"dataset.json", "train.txt", "val.txt", "test_vol.txt"}
    for modality in record.get("modalities", MODALITIES):
        paths |= {modality, f"{modality}/train_npz", f"{modality}/test_vol_h5"}
        paths |= {f"{modality}/train_npz/{name}.npz" for name in listed("train.txt")}
        paths |= {f"{modality}/test_vol_h5/{name}.npy.h5" for name in listed("val.txt") + listed("test_vol.txt")}
    return paths


def _prepare_destination(dst):
    """Refuse to replace anything but a previous output of this script that holds only what it wrote."""
    if dst.exists() and not dst.is_dir():
        raise DataError(f"--dst_path {dst} is a file; give a folder (new, empty, or a previous output)")
    if dst.exists() and any(dst.iterdir()):
        marker = dst / "dataset.json"
        try:
            record = json.loads(marker.read_text())
            owned = isinstance(record, dict) and record.get("format") == RECORD_FORMAT
        except (OSError, ValueError):
            owned = False
        if not owned:
            raise DataError(f"{dst} exists and is not an output of preprocess_data.py (no {marker.name} of format "
                            f"{RECORD_FORMAT}); choose an empty or new --dst_path")
        written = _previous_output(dst, record)
        foreign = sorted(path.relative_to(dst).as_posix() for path in dst.rglob("*")
                         if path.relative_to(dst).as_posix() not in written)
        if foreign:
            shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise DataError(f"{dst} is a previous output of preprocess_data.py, but it also holds what that run did "
                            f"not write, which replacing it would delete: {shown}. Move them elsewhere, or choose "
                            "another --dst_path")


def _remove_stale_staging(dst):
    """Delete the staging folders beside dst that killed runs left behind (only those whose process is gone)."""
    for folder in dst.parent.glob(f".{dst.name}.staging-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, left by a run that was stopped (process %s is gone)", folder, pid)


def _replace_directory(staging, dst):
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(staging, dst)
    shutil.rmtree(old, ignore_errors=True)


def read_heart_centres(args, split):
    """The centres file of a heart-centred crop, checked before any case is processed: every validation and
    test case needs its centre there (their own labels are never used to place their crop)."""
    if args.crop_centre == "image":
        if args.heart_centres is not None:
            raise DataError("--heart_centres goes with --crop_centre heart")
        return {}
    centres = read_centres(args.heart_centres) if args.heart_centres is not None else {}
    missing = sorted(set(split["val"] + split["test"]) - set(centres))
    if missing:
        raise DataError(f"--crop_centre heart: the validation and test cases {missing} have no centre in "
                        f"{args.heart_centres or '(no --heart_centres given)'}; locate them with locate_heart.py "
                        "(a coarse model's prediction), never with their own labels")
    return centres


def write_dataset(args):
    """Preprocess every case of --src_path into --dst_path (staged, moved into place when all succeeded); the
    summary of what was written."""
    start = time.time()
    finder, label_map, default_spacing = DATASETS[args.dataset]
    spacing = default_spacing if args.spacing is None else args.spacing
    if args.dataset == "Phantom" and not (args.src_path / "Raw_data").exists():
        from datasets.phantom import write_phantom

        logger.info("generating %d phantom cases into %s", args.phantom_cases, args.src_path)
        write_phantom(args.src_path, args.phantom_cases, args.seed)
    cases = finder(args.src_path)
    split = split_cases([c.case_id for c in cases], args.test_every, args.val_fraction, args.seed, args.split_file)
    role_of = {case: role for role, ids in split.items() for case in ids}
    centres = read_heart_centres(args, split)
    dst = args.dst_path.resolve()
    _prepare_destination(dst)
    _remove_stale_staging(dst)
    staging = dst.with_name(f".{dst.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for modality in MODALITIES:
            (staging / modality / "train_npz").mkdir(parents=True)
            (staging / modality / "test_vol_h5").mkdir(parents=True)
        voxels = np.zeros(len(CLASS_NAMES), dtype=np.int64)
        slices = {"train": 0, "val": 0, "test": 0}
        train_slices, crop_centres = [], {}
        for case in tqdm(cases, desc="cases", unit="case"):
            role = role_of[case.case_id]
            depth, counts, crop_centres[case.case_id] = process_case(case, label_map, args, spacing, role, staging,
                                                                     centres)
            slices[role] += depth
            voxels += counts
            if role == "train":
                train_slices += [f"{case.case_id}_slice{z:03d}" for z in range(depth)]
        for name, lines in (("train.txt", train_slices), ("val.txt", split["val"]), ("test_vol.txt", split["test"])):
            (staging / name).write_text("".join(f"{line}\n" for line in lines))
        summary = {"cases": {role: len(ids) for role, ids in split.items()}, "slices": slices,
                   "voxels_per_class": dict(zip(CLASS_NAMES, voxels.tolist()))}
        settings = {"dataset": args.dataset, "src_path": str(args.src_path.resolve()), "spacing_mm": spacing,
                    "crop_size": args.crop_size, "crop_centre": args.crop_centre,
                    "heart_centres": str(args.heart_centres.resolve()) if args.heart_centres else None,
                    **intensity_settings(args),
                    "test_every": args.test_every, "val_fraction": args.val_fraction, "seed": args.seed,
                    "split_file": str(args.split_file) if args.split_file else None}
        write_record(staging, settings, split, summary, crop_centres)
        _replace_directory(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("%s: %d cases (train %d, val %d, test %d), slices %s, voxels per class %s, %.1f s -> %s",
                args.dataset, len(cases), len(split["train"]), len(split["val"]), len(split["test"]), slices,
                summary["voxels_per_class"], time.time() - start, dst)
    return summary


def run_preprocessing(args):
    """preprocess_data.py's run: the exit code (1 with the error logged when the data or the destination is bad)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        write_dataset(args)
    except DataError as error:
        logger.error("%s", error)
        return 1
    return 0
