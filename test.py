"""Evaluate a trained run: per-case Dice and HD95 (mm), NIfTI predictions in the original geometry, a summary.

    python test.py <the train.py flags of the run>            # finds the run folder the same way
    python test.py --output_dir weights/TU_MyoPS2020128/<run> --checkpoint best --save_png

The model configuration comes from the checkpoint; a flag given here that
contradicts it is an error. When a test volume carries its preprocessing geometry
and its source label is readable, predictions are mapped back (probabilities
resampled linearly, then argmax) and scored against the original label at the
original spacing; otherwise they are scored in the processed grid. Undefined
values (a structure absent from prediction or reference) follow utils.dice_hd95:
NaN, left out of the means, and counted.

Outputs in --test_save_dir (default <run>/test_<split>_<checkpoint>):
metrics.csv, summary.json, test_info.json, <case>_pred.nii.gz, and <case>.png with --save_png.
"""
import argparse
import csv
import gzip
import json
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from datasets.dataset_myops import MyoPSDataset
from datasets.geometry import probabilities_to_original
from datasets.layouts import DataError, map_labels
from networks.inference import fuse_for_inference, predict_volume
from trainer import (ABLATIONS, CheckpointError, add_run_arguments, configure_logging, filled, load_checkpoint,
                     load_model_state, model_from_spec, run_directory, seed_everything, setup_distributed)
from utils import PATHOLOGY, STRUCTURES, atomic_path, case_metrics, summarise

logger = logging.getLogger("test")

COLOURS = {1: (0, 200, 0), 2: (255, 220, 0), 3: (0, 120, 255)}  # myocardium, scar, edema
TABLE_NAMES = {"scar": "Scar", "edema": "Edema", "myocardium": "Myocardium", "scar_edema": "Scar+edema",
               "whole_myocardium": "Whole myocardium"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, with_defaults=False)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file, or a name in the run folder (best, last, epoch_N); "
                             "default: best.pth if present, else last.pth")
    parser.add_argument("--split", default="test_vol", choices=["test_vol", "val"], help="list of volumes to score")
    parser.add_argument("--save_nii", "--is_savenii", dest="save_nii", action="store_true", default=True,
                        help="write <case>_pred.nii.gz (the default; --is_savenii is the released name)")
    parser.add_argument("--no_save_nii", dest="save_nii", action="store_false", help="do not write NIfTI predictions")
    parser.add_argument("--save_png", action="store_true", help="write a PNG overlay per case")
    parser.add_argument("--test_save_dir", type=Path, default=None, help="output folder")
    parser.add_argument("--batch_slices", type=int, default=16, help="slices predicted per batch")
    parser.add_argument("--tta", action="store_true", help="average the predictions over the four flips")
    return parser.parse_args(argv)


def resolve_checkpoint(args, run_dir):
    if args.checkpoint is None:
        best = run_dir / "best.pth"
        return best if best.is_file() else run_dir / "last.pth"
    path = Path(args.checkpoint)
    if path.is_file() or path.suffix == ".pth" or len(path.parts) > 1:
        return path
    return run_dir / f"{args.checkpoint}.pth"


def check_flags_against(spec, args):
    """Every model-defining flag given on the command line must agree with the checkpoint."""
    config = spec["config"]
    checkpoint_values = {"vit_name": config.get("name"), "n_skip": config.get("n_skip"), "img_size": spec["img_size"],
                         "num_classes": spec["num_classes"], "model": spec["model"],
                         "vit_patches_size": list(config.get("patches", {}).get("size", [16]))[0]}
    if spec["model"] == "transunet_single":
        checkpoint_values["modality"] = spec["modality"]
    conflicts = [f"--{name} {getattr(args, name)} (the checkpoint has {value})"
                 for name, value in checkpoint_values.items()
                 if getattr(args, name, None) is not None and getattr(args, name) != value]
    conflicts += [f"--{flag} (the checkpoint was trained with {switch} = True)"
                  for flag, switch in ABLATIONS.items() if getattr(args, flag) and config.get(switch, True)]
    if conflicts:
        raise CheckpointError("flags contradict the checkpoint's configuration: " + "; ".join(conflicts)
                              + ". Leave them out: test.py reads the configuration from the checkpoint.")


def reference_in_original_space(volume):
    """The source label mapped to classes 0-3, or None when the volume has no geometry or its source is gone."""
    meta, geometry = volume["meta"], volume["geometry"]
    source = Path(meta.get("source_label", ""))
    if geometry is None or not source.is_file():
        logger.warning("%s: %s; scoring in the processed grid", volume["case_name"],
                       "no geometry in the volume" if geometry is None else f"source label {source} not found")
        return None
    label_map = {int(k): v for k, v in json.loads(meta["label_map"]).items()}
    return map_labels(np.asarray(nib.load(str(source)).dataobj), label_map, volume["case_name"], source)


def save_nifti(prediction, affine, path):
    """Atomic .nii.gz write (nibabel picks the format from the name, so bytes are written here)."""
    image = nib.Nifti1Image(prediction.astype(np.uint8), affine)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as temporary:
        temporary.write_bytes(gzip.compress(image.to_bytes(), mtime=0))


def save_overlay(image, label, prediction, path):
    """One row per slice: LGE, LGE with the reference, LGE with the prediction."""
    rows = []
    for z in range(label.shape[2]):
        grey = (np.clip(image[1, :, :, z], 0, 1) * 255).astype(np.uint8)
        base = np.stack([grey] * 3, axis=-1).astype(np.float32)
        panels = [base]
        for mask in (label[:, :, z], prediction[:, :, z]):
            overlay = base.copy()
            for value, colour in COLOURS.items():
                overlay[mask == value] = 0.4 * overlay[mask == value] + 0.6 * np.asarray(colour)
            panels.append(overlay)
        rows.append(np.concatenate(panels, axis=1))
    with atomic_path(path) as temporary:
        Image.fromarray(np.concatenate(rows, axis=0).astype(np.uint8)).save(temporary, format="PNG")


def format_table(summary):
    def cell(entry, key, scale):
        mean, std = entry[key], entry[f"{key}_std"]
        return "n/a" if mean is None else f"{mean * scale:6.2f} ± {std * scale:5.2f}"

    lines = [f"{'Structure':<18}{'Dice (%)':>16}{'HD95 (mm)':>18}{'n':>5}{'undefined HD95':>16}"]
    for name in ("scar", "edema", "myocardium", "scar_edema", "whole_myocardium"):
        entry = summary[name]
        lines.append(f"{TABLE_NAMES[name]:<18}{cell(entry, 'dice', 100):>16}{cell(entry, 'hd95', 1):>18}"
                     f"{entry['n']:>5}{entry['n_undefined_hd95']:>16}")
    pathology = [summary[name] for name in PATHOLOGY]
    if all(entry["dice"] is not None for entry in pathology):
        dice = np.mean([entry["dice"] for entry in pathology]) * 100
        hd = [entry["hd95"] for entry in pathology]
        hd_text = f"{np.mean(hd):6.2f}" if all(h is not None for h in hd) else "n/a"
        lines.append(f"{'Mean pathology':<18}{dice:>16.2f}{hd_text:>18}")
    return "\n".join(lines)


def evaluate(args):
    args.checkpoint_path = resolve_checkpoint(args, args.run_dir)
    ctx = setup_distributed(args.device)
    checkpoint = load_checkpoint(args.checkpoint_path, map_location="cpu")
    spec = checkpoint["spec"]
    check_flags_against(spec, args)
    model = model_from_spec(spec, checkpoint["model"])
    load_model_state(model, checkpoint["model"], args.checkpoint_path)
    model = fuse_for_inference(model.to(ctx.device))
    root = args.root_path or Path(checkpoint["args"]["root_path"])
    dataset = MyoPSDataset(root, args.list_dir or root, args.split)
    out_dir = args.test_save_dir or args.run_dir / f"test_{args.split}_{args.checkpoint_path.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("checkpoint %s (epoch %d), %d %s volumes from %s -> %s", args.checkpoint_path,
                checkpoint["train_state"]["epoch"], len(dataset), args.split, root, out_dir)

    rows, per_case, spaces = [], [], {}
    start = time.time()
    for index in range(len(dataset)):
        volume = dataset[index]
        case = volume["case_name"]
        probabilities = predict_volume(model, volume["image"], spec["img_size"], args.batch_slices, ctx.device,
                                       args.amp, tta=args.tta)
        processed_prediction = probabilities.argmax(dim=0).numpy().astype(np.uint8)
        reference = reference_in_original_space(volume)
        geometry = volume["geometry"]
        if reference is not None:
            prediction = probabilities_to_original(probabilities.numpy(), geometry)
            spacing, affine, space = geometry.original_spacing, geometry.affine_array, "original"
        else:
            prediction, reference = processed_prediction, volume["label"].numpy()
            spacing = geometry.processed_spacing if geometry is not None else (1.0, 1.0, 1.0)
            affine, space = np.diag(list(spacing) + [1.0]), "processed" if geometry is not None else "voxels"
        metrics = case_metrics(prediction, reference, spacing)
        per_case.append(metrics)
        spaces[case] = space
        rows += [{"case": case, "structure": name, "dice": dice, "hd95": hd, "space": space}
                 for name, (dice, hd) in metrics.items()]
        if args.save_nii:
            save_nifti(prediction, affine, out_dir / f"{case}_pred.nii.gz")
        if args.save_png:
            save_overlay(volume["image"].numpy(), volume["label"].numpy(), processed_prediction,
                         out_dir / f"{case}.png")
        logger.info("%s (%s space): %s", case, space, ", ".join(
            f"{name} {dice:.3f}/{hd:.2f}mm" for name, (dice, hd) in metrics.items()))

    summary = summarise(per_case)
    with atomic_path(out_dir / "metrics.csv") as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case", "structure", "dice", "hd95", "space"])
            writer.writeheader()
            writer.writerows(rows)
    with atomic_path(out_dir / "summary.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
    info = {"checkpoint": str(args.checkpoint_path), "epoch": checkpoint["train_state"]["epoch"],
            "split": args.split, "tta": args.tta, "root_path": str(root), "space": spaces, "spec": spec,
            "seconds": round(time.time() - start, 2), "structures": {k: list(v) for k, v in STRUCTURES.items()}}
    with atomic_path(out_dir / "test_info.json") as temporary:
        temporary.write_text(json.dumps(info, indent=2, default=str) + "\n")
    logger.info("scored in the %s space\n%s", "/".join(sorted(set(spaces.values()))), format_table(summary))
    return summary


def main(argv=None):
    args = parse_args(argv)
    configure_logging()
    seed_everything(1234 if args.seed is None else args.seed, args.deterministic)
    args.run_dir = Path(args.output_dir) if args.output_dir else run_directory(filled(args))
    try:
        with torch.inference_mode():
            evaluate(args)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
