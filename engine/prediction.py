"""Segmenting new patients as predict.py does: its flags, each raw case predicted by a run or an ensemble in the
patient's own geometry, the label volumes and volumes.csv written case by case."""
import argparse
import csv
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.export import save_nifti
from datasets.layouts import DataError, find_cases, load_case
from datasets.postprocessing import keep_largest_myocardium
from datasets.vocabulary import LABEL_MAPS, MODALITIES
from engine.checkpoints import CheckpointError
from engine.distributed import setup_distributed
from engine.options import resolve_device_defaults
from engine.overlays import save_overlay
from engine.predictor import HeartLocator, load_ensemble, member_models, predict_case, stacked_sequences
from engine.report_page import write_prediction_page
from engine.runs import configure_logging
from engine.subset_limits import not_measurable
from networks.inference import warn_if_bf16_is_emulated
from utils import STRUCTURES, atomic_path

logger = logging.getLogger("predict")

# class -> value written, per --label_values; the challenge's codes are its label map read backwards
OUTPUT_LABELS = {"default": {1: 1, 2: 2, 3: 3},
                 "myops2020": {target: code for code, target in LABEL_MAPS["MyoPS2020"].items() if target}}
# volumes.csv column -> the classes it counts (utils.STRUCTURES: "myocardium" is the normal myocardium)
VOLUME_STRUCTURES = {"normal_myocardium_ml": "myocardium", "scar_ml": "scar", "edema_ml": "edema",
                     "whole_myocardium_ml": "whole_myocardium"}
VOLUME_COLUMNS = ["case", "sequences", *VOLUME_STRUCTURES, "scar_percent", "edema_percent", "not_measurable",
                  "checkpoint", "error"]
PREDICTION_PATTERNS = ("*.nii.gz", "*.nii", "volumes.csv")


def prediction_parser(description=__doc__):
    """predict.py's flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", type=Path, required=True, help="folder of raw cases (see above)")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for the predictions and volumes.csv")
    parser.add_argument("--run", type=Path, nargs="+", required=True,
                        help="run folder of train.py; several: an ensemble, their probabilities averaged")
    parser.add_argument("--locator_run", type=Path, default=None,
                        help="coarse run that locates the heart, for a run trained on heart-centred crops")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file, or a name in the run folder (best, last, epoch_N); "
                             "default: best.pth if present, else last.pth")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--amp", default="auto", choices=["auto", "none", "fp16", "bf16"],
                        help="mixed precision (auto: bf16 on a GPU that computes it natively, compute capability 8.0 "
                             "or newer; none elsewhere)")
    parser.add_argument("--tta", action="store_true", help="average the predictions over the four flips")
    parser.add_argument("--postprocess", action="store_true",
                        help="keep only the largest 3-D connected component of the whole myocardium (scar and "
                             "edema outside it become background), in the written labels and the overlays")
    parser.add_argument("--save_png", action="store_true", help="write an overlay per case (processed grid)")
    parser.add_argument("--label_values", default="default", choices=sorted(OUTPUT_LABELS),
                        help="values written: default 0-3; myops2020: 200 myocardium, 2221 scar, 1220 edema")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an output folder that already holds predictions: those of the cases "
                             "given are replaced, or removed when the case fails")
    parser.add_argument("--batch_slices", type=int, default=16, help="slices predicted per batch")
    return parser


def parse_prediction_args(argv=None, description=__doc__):
    return prediction_parser(description).parse_args(argv)


def check_output_dir(output_dir, overwrite):
    """Refuse an output folder that holds predictions, unless --overwrite."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"--output_dir {output_dir} is a file; choose a folder")
    existing = sorted(p.name for pattern in PREDICTION_PATTERNS for p in output_dir.glob(pattern)) \
        if output_dir.is_dir() else []
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise DataError(f"--output_dir {output_dir} already holds predictions ({shown}); choose another folder or "
                        "pass --overwrite to replace those of the cases given")
    if existing:
        logger.warning("--overwrite: the predictions in %s of the cases given are replaced (or removed if the case "
                       "fails); volumes.csv lists only this run's cases", output_dir)


def remove_earlier_outputs(output_dir, case_id):
    """Delete a failed case's outputs of an earlier run (--overwrite), so that none is taken for this run's."""
    for path in (output_dir / f"{case_id}.nii.gz", output_dir / f"{case_id}.png"):
        if path.is_file():
            path.unlink()
            logger.warning("%s: removed %s of an earlier run", case_id, path)


def output_labels(prediction, label_values):
    """Classes 0-3 -> the values written (uint8, or uint16 for the challenge's codes)."""
    mapping = OUTPUT_LABELS[label_values]
    lookup = np.zeros(len(mapping) + 1, dtype=np.uint16 if max(mapping.values()) > 255 else np.uint8)
    for target, value in mapping.items():
        lookup[target] = value
    return lookup[prediction]


def tissue_volumes(prediction, spacing):
    """mL per structure of a class-0-3 volume, and scar and edema in % of the whole myocardium (NaN if none)."""
    voxel_ml = float(np.prod(spacing[:3])) / 1000.0
    volumes = {column: float(np.isin(prediction, STRUCTURES[name]).sum()) * voxel_ml
               for column, name in VOLUME_STRUCTURES.items()}
    whole = volumes["whole_myocardium_ml"]
    for name in ("scar", "edema"):
        volumes[f"{name}_percent"] = 100.0 * volumes[f"{name}_ml"] / whole if whole > 0 else math.nan
    return volumes


def withhold_unmeasurable(volumes, sequences, case_id):
    """``volumes`` with those of the structures that ``sequences`` cannot measure (engine.subset_limits) left empty,
    their reasons in "not_measurable" and in the log."""
    reasons = not_measurable(sequences)
    for structure, reason in reasons.items():
        logger.warning("%s: no %s volume: %s", case_id, structure, reason)
    withheld = {column: None for structure in reasons for column in (f"{structure}_ml", f"{structure}_percent")}
    return {**volumes, **withheld, "not_measurable": "; ".join(reasons.values())}


def write_volumes(rows, path):
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=VOLUME_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def heart_locator(settings, args, checkpoint_path):
    """The coarse model placing a heart-centred run's crop (None for an image-centred run)."""
    if settings.crop_centre == "image":
        if args.locator_run is not None:
            raise CheckpointError(f"--locator_run: {checkpoint_path} was trained on image-centred crops and needs "
                                  "no heart locator")
        return None
    if args.locator_run is None:
        raise CheckpointError(f"{checkpoint_path} was trained on crops around the heart: give --locator_run, the "
                              "coarse run that finds the heart (see locate_heart.py)")
    return HeartLocator(args.locator_run, device=args.device, batch_slices=args.batch_slices)


def predict_and_write(case, members, args, device, locator):
    """Read, predict and write one case from the sequences it has (a subset only for members that are subset
    stages); its volumes.csv row (with the slice count under "slices")."""
    volumes = load_case(case, allow_missing_sequences=True)
    sequences = [name for name in MODALITIES if name in volumes.images]
    try:
        models = member_models(members, sequences)
    except DataError as error:
        missing = "; ".join(f"missing {name} file {path}" for name, path in case.images.items()
                            if name not in sequences)
        raise DataError(f"{missing}: {error}") from None
    centre = locator(volumes) if locator is not None else None
    if locator is not None and centre is None:
        raise DataError(f"the locator {locator.checkpoint_path} finds no myocardium to centre the crop on")
    first = members[0]
    prediction, processed, prepared = predict_case(models, volumes, first.modalities, first.settings, args, device,
                                                   first.img_size, centre)
    if args.postprocess:
        prediction, processed = keep_largest_myocardium(prediction), keep_largest_myocardium(processed)
    header = volumes.headers["LGE" if "LGE" in volumes.headers else sequences[0]]
    written = save_nifti(output_labels(prediction, args.label_values), header.get_best_affine(),
                         args.output_dir / f"{case.case_id}.nii.gz", header=header)
    if args.save_png:
        save_overlay(args.output_dir / f"{case.case_id}.png", case.case_id, stacked_sequences(prepared, MODALITIES),
                     processed, note="prediction (no reference), drawn in the processed grid",
                     unused=[name for name in MODALITIES if name not in sequences])
    volumes = withhold_unmeasurable(tissue_volumes(prediction, written.header.get_zooms()), sequences, case.case_id)
    return {"case": case.case_id, "sequences": ";".join(sequences), **volumes, "slices": prediction.shape[2]}


def page_setting(members, locator, args):
    """The setting listed on index.html: [(name, value)]."""
    return [("checkpoint", "; ".join(f"{member.checkpoint_path} (epoch {member.epoch})" for member in members)),
            ("input", str(args.input_dir)), ("TTA (four flips)", "yes" if args.tta else "no"),
            ("postprocess (largest myocardium)", "yes" if args.postprocess else "no"),
            ("label values", args.label_values),
            ("heart locator", str(locator.checkpoint_path) if locator is not None else "none (image-centred crops)")]


def predict(args):
    """Predict every case under --input_dir; returns {case: reason} of the cases that failed."""
    cases = find_cases(args.input_dir, labelled=False)
    check_output_dir(args.output_dir, args.overwrite)
    device = setup_distributed(args.device).device
    resolve_device_defaults(args, device)
    warn_if_bf16_is_emulated(device, args.amp, logger)
    members = load_ensemble(args.run, args.checkpoint, device)
    settings = members[0].settings
    checkpoints = ";".join(str(member.checkpoint_path) for member in members)
    locator = heart_locator(settings, args, checkpoints)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    setting = page_setting(members, locator, args)
    logger.info("%s on %s; preprocessing %s; tta %s, postprocess %s; %d cases from %s -> %s",
                ", ".join(f"checkpoint {member.checkpoint_path} (epoch {member.epoch})" for member in members),
                device, settings, args.tta, args.postprocess, len(cases), args.input_dir, args.output_dir)

    rows, failures, start = [], {}, time.perf_counter()
    for case in tqdm(cases, desc="cases", unit="case"):
        case_start = time.perf_counter()
        try:
            row = predict_and_write(case, members, args, device, locator)
        except Exception as error:  # noqa: BLE001 - one case's failure, whatever it is, never stops the others
            reason = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
            logger.error("%s: skipped: %s", case.case_id, reason)
            logger.debug("%s failed", case.case_id, exc_info=True)
            failures[case.case_id] = reason
            remove_earlier_outputs(args.output_dir, case.case_id)
            row = {"case": case.case_id, "error": reason}
        else:
            logger.info("%s: %d slices from %s, %.2f s (read, predicted, written)", case.case_id, row.pop("slices"),
                        row["sequences"].replace(";", ", "), time.perf_counter() - case_start)
        rows.append({**row, "checkpoint": checkpoints})
        write_volumes(rows, args.output_dir / "volumes.csv")
        write_prediction_page(args.output_dir, setting, rows)
    if failures:
        logger.error("%d of %d cases failed and have no output:\n  %s", len(failures), len(cases),
                     "\n  ".join(f"{case}: {reason}" for case, reason in failures.items()))
    logger.info("%d cases predicted in %.1f s -> %s", len(rows), time.perf_counter() - start, args.output_dir)
    return failures


def run_prediction(args):
    """predict.py's run: the exit code (1 when an error stops it or a case fails; the log names why)."""
    configure_logging()
    try:
        with torch.inference_mode():
            failures = predict(args)
    except (CheckpointError, DataError, ValueError) as error:
        logger.error("%s", error)
        return 1
    return 1 if failures else 0
