"""Turn multi-sequence NIfTI volumes into the training slices and test volumes that train.py and test.py read.

    python preprocess_data.py --dataset MyoPS2020 --src_path ../shared/data/myops2020 --dst_path data/MyoPS2020
    python preprocess_data.py --dataset MyoPS380 --src_path MyoPS380_dataset --dst_path data/MyoPS380 --test_every 5
    python preprocess_data.py --dataset Phantom --src_path data/phantom_raw --dst_path data/Phantom --phantom_cases 24

Per case: check that the three sequences and the label share shape and geometry,
map the labels to 0-3, resample in-plane to --spacing (images cubic, labels
nearest), crop or pad to --crop_size around the image centre (the same at training
and test time), and map each sequence to [0, 1] by the percentiles of its field of
view (padding excluded): they vary less between cases than whole-volume ones.

Output (the released code's layout), under --dst_path:
    {bSSFP,LGE,T2w}/train_npz/<case>_sliceNNN.npz   image (C x C, float32 in [0, 1]), label (uint8)
    {bSSFP,LGE,T2w}/test_vol_h5/<case>.npy.h5       image, label (C x C x D) and the geometry to undo it
    train.txt (slices), val.txt and test_vol.txt (cases), dataset.json (settings and summary)
Validation and test cases get volumes, training cases slices. Everything is
written to a staging folder first and moved into place only when all cases
succeeded, so an error leaves the destination as it was.
"""
import argparse
import io
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from datasets.geometry import plan_geometry, to_processed
from datasets.layouts import LABEL_MAPS, DataError, find_myops2020_cases, find_myops380_cases, load_case
from networks.vit_seg_configs import CLASS_NAMES, MODALITIES

logger = logging.getLogger("preprocess")

FORMAT = "immseg-preprocessed/1"
DATASETS = {
    # name: (case finder, label map, default in-plane spacing in mm)
    "MyoPS380": (find_myops380_cases, LABEL_MAPS["MyoPS380"], 1.0),
    "MyoPS2020": (find_myops2020_cases, LABEL_MAPS["MyoPS2020"], 1.4),
    "Phantom": (find_myops380_cases, LABEL_MAPS["MyoPS380"], 1.0),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--src_path", type=Path, required=True, help="raw dataset folder")
    parser.add_argument("--dst_path", type=Path, required=True, help="preprocessed output folder")
    parser.add_argument("--spacing", type=float, default=None,
                        help="in-plane target spacing in mm (default: 1.0 for MyoPS380 and Phantom, 1.4 for "
                             "MyoPS2020, whose myocardium reaches 84 mm from the image centre); 0 keeps the spacing")
    parser.add_argument("--crop_size", type=int, default=128, help="field of view in pixels after resampling")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5),
                        help="intensity percentiles of each sequence's field of view mapped to 0 and 1")
    parser.add_argument("--test_every", type=int, default=5,
                        help="every N-th case (in sorted order) is a test case, as in the paper; 0: none; "
                             "1: all (an evaluation-only dataset)")
    parser.add_argument("--split_file", type=Path, default=None,
                        help='JSON {"test": [...], "val": [...]} overriding --test_every and --val_fraction')
    parser.add_argument("--val_fraction", type=float, default=0.0,
                        help="fraction of the non-test cases held out for validation (val.txt)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the validation draw and of the phantom")
    parser.add_argument("--phantom_cases", type=int, default=24,
                        help="with --dataset Phantom: cases generated into --src_path if it holds none")
    return parser.parse_args(argv)


def split_cases(case_ids, test_every=5, val_fraction=0.0, seed=1234, split_file=None):
    """Deterministic train / val / test split of sorted case ids."""
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
        test = [c for i, c in enumerate(case_ids) if test_every and (i + 1) % test_every == 0]
        rest = [c for c in case_ids if c not in test]
        order = np.random.default_rng(seed).permutation(len(rest))
        val = sorted(rest[i] for i in order[:int(round(val_fraction * len(rest)))])
    train = [c for c in case_ids if c not in set(test) | set(val)]
    return {"train": train, "val": val, "test": test}


def normalise(image, percentiles):
    """Map the percentiles of the image's defined (non-NaN) pixels to [0, 1], clip, and set NaN padding to 0.

    Robust to raw scanner ranges; a field of view without contrast is mapped by its extremes.
    """
    low, high = np.nanpercentile(image, percentiles)
    if high <= low:
        low, high = np.nanmin(image), np.nanmax(image)
    if high <= low:
        high = low + 1.0
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0)
    return np.nan_to_num(scaled, nan=0.0).astype(np.float32), (float(low), float(high))


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


def process_case(case, label_map, args, spacing, role, staging):
    """Write one case's slices (training) or volumes (validation / test); return its counts."""
    volumes = load_case(case, label_map)
    geometry = plan_geometry(volumes.label.shape, volumes.spacing, volumes.affine, spacing, args.crop_size)
    label = to_processed(volumes.label, geometry, order=0)
    processed, ranges = {}, {}
    for modality in MODALITIES:
        field_of_view = to_processed(volumes.images[modality], geometry, order=3, fill=np.nan)
        processed[modality], ranges[modality] = normalise(field_of_view, args.percentiles)
    for modality in MODALITIES:
        if role == "train":
            folder = staging / modality / "train_npz"
            for z in range(label.shape[2]):
                write_npz(folder / f"{case.case_id}_slice{z:03d}.npz", image=processed[modality][..., z],
                          label=label[..., z])
        else:
            attrs = {"case": case.case_id, "modality": modality, "source_image": str(case.images[modality]),
                     "source_label": str(case.label), "intensity_range": np.asarray(ranges[modality]),
                     "percentiles": np.asarray(args.percentiles), "label_map": json.dumps(label_map),
                     **geometry.to_attrs()}
            write_volume(staging / modality / "test_vol_h5" / f"{case.case_id}.npy.h5",
                         processed[modality], label, attrs)
    return label.shape[2], np.bincount(label.ravel(), minlength=len(CLASS_NAMES))


def _prepare_destination(dst):
    """Refuse to replace a folder that is not a previous output of this script."""
    if dst.exists() and any(dst.iterdir()):
        marker = dst / "dataset.json"
        try:
            owned = json.loads(marker.read_text()).get("format") == FORMAT
        except (OSError, json.JSONDecodeError):
            owned = False
        if not owned:
            raise DataError(f"{dst} exists and is not an output of preprocess_data.py (no {marker.name} of format "
                            f"{FORMAT}); choose an empty or new --dst_path")


def _replace_directory(staging, dst):
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(staging, dst)
    shutil.rmtree(old, ignore_errors=True)


def run(args):
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
    dst = args.dst_path.resolve()
    _prepare_destination(dst)
    staging = dst.with_name(f".{dst.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for modality in MODALITIES:
            (staging / modality / "train_npz").mkdir(parents=True)
            (staging / modality / "test_vol_h5").mkdir(parents=True)
        voxels = np.zeros(len(CLASS_NAMES), dtype=np.int64)
        slices = {"train": 0, "val": 0, "test": 0}
        train_slices = []
        for case in tqdm(cases, desc="cases", unit="case"):
            role = role_of[case.case_id]
            depth, counts = process_case(case, label_map, args, spacing, role, staging)
            slices[role] += depth
            voxels += counts
            if role == "train":
                train_slices += [f"{case.case_id}_slice{z:03d}" for z in range(depth)]
        for name, lines in (("train.txt", train_slices), ("val.txt", split["val"]), ("test_vol.txt", split["test"])):
            (staging / name).write_text("".join(f"{line}\n" for line in lines))
        summary = {"cases": {role: len(ids) for role, ids in split.items()}, "slices": slices,
                   "voxels_per_class": dict(zip(CLASS_NAMES, voxels.tolist()))}
        settings = {"dataset": args.dataset, "src_path": str(args.src_path.resolve()), "spacing_mm": spacing,
                    "crop_size": args.crop_size, "percentiles": list(args.percentiles),
                    "test_every": args.test_every, "val_fraction": args.val_fraction, "seed": args.seed,
                    "split_file": str(args.split_file) if args.split_file else None}
        (staging / "dataset.json").write_text(json.dumps(
            {"format": FORMAT, "modalities": list(MODALITIES), "classes": list(CLASS_NAMES), "settings": settings,
             "split": split, "summary": summary}, indent=2) + "\n")
        _replace_directory(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("%s: %d cases (train %d, val %d, test %d), slices %s, voxels per class %s, %.1f s -> %s",
                args.dataset, len(cases), len(split["train"]), len(split["val"]), len(split["test"]), slices,
                summary["voxels_per_class"], time.time() - start, dst)
    return summary


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except DataError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
