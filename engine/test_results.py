"""test.py's results folder: its name and setting (a folder holding another setting's results is refused), and
the tables and files written into it."""
import csv
import json
import logging
from pathlib import Path

import numpy as np

from datasets.layouts import DataError
from datasets.vocabulary import MODALITIES
from utils import PATHOLOGY, atomic_path, summarise_released

logger = logging.getLogger("test")

TABLE_NAMES = {"scar": "Scar", "edema": "Edema", "myocardium": "Myocardium", "scar_edema": "Scar+edema",
               "whole_myocardium": "Whole myocardium"}
HD95_UNITS = {"original": "mm", "processed": "mm", "voxels": "voxel"}  # voxels: no geometry, unit spacing


# What a results folder's figures depend on: test_info.json records it, and a folder holding another one's results is
# refused unless --overwrite.
RESULT_FILES = ("metrics.csv", "summary.json", "test_info.json", "index.html", "metrics_released_protocol.csv",
                "summary_released_protocol.json", "*_pred.nii.gz", "*.png")


def results_setting(args, members, root):
    return {"checkpoint": str(args.checkpoint_path), "ensemble": [str(path) for path, _, _ in members],
            "split": args.split, "tta": args.tta, "postprocess": args.postprocess, "heads": list(args.heads),
            "sequences": list(args.sequences), "missing": args.missing,
            "protocol": args.protocol, "root_path": str(root)}


def results_folder_name(args, members):
    """test_<split>_<checkpoint>, with a suffix for each option that changes the figures."""
    name = f"test_{args.split}_{args.checkpoint_path.stem}" + (f"_ensemble{members}" if members > 1 else "")
    name += "_tta" if args.tta else ""
    name += f"_heads-{'-'.join(args.heads)}" if tuple(args.heads) != ("fused",) else ""
    if tuple(args.sequences) != MODALITIES:
        name += f"_sequences-{'-'.join(args.sequences)}" + ("-zerofill" if args.missing == "zero_fill" else "")
    name += "_postprocess" if args.postprocess else ""
    return name + ("_released" if args.protocol == "released" else "")


def check_results_folder(out_dir, setting, overwrite):
    """Refuse a folder holding another setting's results (its test_info.json), unless --overwrite: then delete
    test.py's files there first. A rerun of the same setting replaces its own files."""
    info_path = Path(out_dir) / "test_info.json"
    if not info_path.is_file():
        return
    try:
        earlier = json.loads(info_path.read_text())
    except (OSError, ValueError):
        earlier = {}
    earlier.setdefault("sequences", list(MODALITIES))  # results from before --sequences used all three
    earlier.setdefault("missing", "leave_out")
    differences = [f"{key} {earlier.get(key)!r} there, {value!r} here" for key, value in setting.items()
                   if earlier.get(key) != value]
    if not differences:
        return
    if not overwrite:
        raise DataError(f"{out_dir} holds the results of another setting ({'; '.join(differences)}): choose another "
                        "--test_save_dir, or pass --overwrite to delete them first")
    removed = [path for pattern in RESULT_FILES for path in sorted(Path(out_dir).glob(pattern))]
    for path in removed:
        path.unlink()
    logger.warning("--overwrite: deleted the %d result files of another setting in %s", len(removed), out_dir)


def format_table(summary, unmeasurable=None):
    """The summary as a table; the structures of ``unmeasurable`` ({structure: reason}, engine.subset_limits) are
    marked with * and their reasons follow."""
    unmeasurable = unmeasurable or {}

    def cell(entry, key, scale):
        mean, std = entry[key], entry[f"{key}_std"]
        return "n/a" if mean is None else f"{mean * scale:6.2f} ± {std * scale:5.2f}"

    hd_header = f"HD95 ({summary['scar']['hd95_unit']})"
    lines = [f"{'Structure':<18}{'Dice (%)':>16}{hd_header:>18}{'n':>5}{'undefined HD95':>16}"]
    for name in ("scar", "edema", "myocardium", "scar_edema", "whole_myocardium"):
        entry = summary[name]
        label = TABLE_NAMES[name] + (" *" if name in unmeasurable else "")
        lines.append(f"{label:<18}{cell(entry, 'dice', 100):>16}{cell(entry, 'hd95', 1):>18}"
                     f"{entry['n']:>5}{entry['n_undefined_hd95']:>16}")
    pathology = [summary[name] for name in PATHOLOGY]
    if all(entry["dice"] is not None for entry in pathology):
        dice = np.mean([entry["dice"] for entry in pathology]) * 100
        hd = [entry["hd95"] for entry in pathology]
        hd_text = f"{np.mean(hd):6.2f}" if all(h is not None for h in hd) else "n/a"
        lines.append(f"{'Mean pathology':<18}{dice:>16.2f}{hd_text:>18}")
    lines += [f"* {reason}" for reason in unmeasurable.values()]
    return "\n".join(lines)


def write_released_protocol(per_case, out_dir, made_with):
    """Write the release's metrics (summary_released_protocol.json, metrics_released_protocol.csv) and log them."""
    summary = summarise_released(list(per_case.values()))
    with atomic_path(out_dir / "metrics_released_protocol.csv") as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case", "structure", "dice", "hd95_px", "rule"])
            writer.writeheader()
            writer.writerows({"case": case, "structure": name, "dice": score.dice, "hd95_px": score.hd95,
                              "rule": score.rule} for case, metrics in per_case.items()
                             for name, score in metrics.items())
    report = {"protocol": "released", "grid": "processed (the network's input grid)",
              "hd95_unit": "pixels, with neighbouring slices one pixel apart; not a physical distance",
              "empty_rule": "a structure absent from prediction or reference scores Dice 1 and HD95 0 when the "
                            "prediction has < 200 voxels and the reference <= 200, else Dice 0 and HD95 0",
              "average": "plain mean over cases; std is the population standard deviation",
              **made_with, "structures": summary}
    with atomic_path(out_dir / "summary_released_protocol.json") as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{TABLE_NAMES[name]:<18}{entry['dice'] * 100:>9.2f} ± {entry['dice_std'] * 100:5.2f}"
             f"{entry['hd95_px']:>9.2f} ± {entry['hd95_px_std']:5.2f}{entry['n_empty_scored_1']:>10}"
             f"{entry['n_empty_scored_0']:>10}" for name, entry in summary.items()]
    logger.info("released protocol (the review release's test.py, on the processed grid): HD95 in PIXELS, not mm, "
                "slices counted one pixel apart; an empty structure scores Dice 1 / HD95 0 (prediction < 200 and "
                "reference <= 200 voxels) or Dice 0 / HD95 0\n%-18s%17s%17s%10s%10s\n%s",
                "Structure", "Dice (%)", "HD95 (px)", "empty->1", "empty->0", "\n".join(lines))


