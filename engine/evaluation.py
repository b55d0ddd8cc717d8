"""Scoring a trained run as test.py does: its flags, the members (run, --ensemble runs, --heads), each test case
predicted and scored in the original image space where its label is readable, and the results folder written."""
import argparse
import csv
import json
import logging
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from datasets.dataset_myops import MyoPSDataset
from datasets.export import save_nifti
from datasets.geometry import probabilities_to_original
from datasets.layouts import DataError, map_labels
from datasets.postprocessing import keep_largest_myocardium
from datasets.preprocessing_record import preprocessing_differences, read_preprocessing
from datasets.vocabulary import MODALITIES
from engine.checkpoints import (CheckpointError, check_fused_head_trained, check_subset_trained, ensemble_checkpoints,
                                inference_model, load_checkpoint)
from engine.distributed import StopRequest, seed_everything, setup_distributed
from engine.options import (ABLATIONS, add_run_arguments, filled, resolve_device_defaults, run_directory,
                            sequence_list)
from engine.overlays import class_dice, save_overlay
from engine.predictor import ensemble_probabilities
from engine.report_page import write_test_page
from engine.runs import configure_logging
from engine.subset_limits import not_measurable
from engine.test_results import (HD95_UNITS, check_results_folder, format_table, results_folder_name,
                                 results_setting, write_released_protocol)
from engine.training import training_parser
from networks.inference import HeadAverage, warn_if_bf16_is_emulated
from networks.missing_sequences import SequenceSubset
from utils import STRUCTURES, atomic_path, case_metrics, released_case_metrics, summarise

logger = logging.getLogger("test")

HEADS = ("fused", *MODALITIES)


def head_list(text):
    """--heads: a comma-separated list of distinct head names -> tuple."""
    heads = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in heads if name not in HEADS]
    if unknown or len(set(heads)) != len(heads):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct names from {', '.join(HEADS)}")
    return heads


def evaluation_parser(description=__doc__):
    """test.py's flags: the run flags, unset unless given (the checkpoint defines the model), and scoring's own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="train.py's other flags are accepted and ignored (the log names them), so "
                                            "that a training command's flags find its run folder; --overwrite and "
                                            "--batch_slices keep the meaning given here.")
    add_run_arguments(parser, with_defaults=False)
    parser.add_argument("--input_sequences", type=sequence_list, default=None,
                        help="the sequences of a --model transunet_early run trained on a subset, as train.py took "
                             "them: they name its run folder (the model itself comes from the checkpoint)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file, or a name in the run folder (best, last, epoch_N); "
                             "default: best.pth if present, else last.pth")
    parser.add_argument("--split", default="test_vol", choices=["test_vol", "val"], help="list of volumes to score")
    parser.add_argument("--save_nii", "--is_savenii", dest="save_nii", action="store_true", default=True,
                        help="write <case>_pred.nii.gz (the default; --is_savenii is the released name)")
    parser.add_argument("--no_save_nii", dest="save_nii", action="store_false", help="do not write NIfTI predictions")
    parser.add_argument("--save_png", action="store_true", help="write a PNG overlay per case")
    parser.add_argument("--test_save_dir", type=Path, default=None,
                        help="output folder (default: <run>/test_<split>_<checkpoint>, with a suffix per option that "
                             "changes the figures: _ensemble<N>, _tta, _heads-..., _postprocess, _released)")
    parser.add_argument("--overwrite", action="store_true",
                        help="score into a folder that holds the results of another setting: they are deleted first")
    parser.add_argument("--batch_slices", type=int, default=16, help="slices predicted per batch")
    parser.add_argument("--tta", action="store_true", help="average the predictions over the four flips")
    parser.add_argument("--ensemble", type=Path, nargs="+", default=[], metavar="RUN_DIR",
                        help="further run folders whose --checkpoint (by name) is averaged with this run's: the class "
                             "probabilities of all members (each after its flip TTA with --tta) are averaged before "
                             "the argmax; each must have been trained on data preprocessed as the test data")
    parser.add_argument("--heads", default="fused", type=head_list,
                        help="I-MMSeg heads whose class probabilities are averaged, comma-separated from fused, "
                             f"{', '.join(MODALITIES)} (default fused, the method's output; the modality heads are "
                             "trained beside it)")
    parser.add_argument("--sequences", default=MODALITIES, type=sequence_list,
                        help="segment from these sequences only, comma-separated (e.g. bSSFP,LGE for patients "
                             "without T2w), with a subset stage (train.py --subsets_from) that leaves the others out "
                             "(default: all three)")
    parser.add_argument("--missing", default="leave_out", choices=["leave_out", "zero_fill"],
                        help="with --sequences, what the model is given for the others: leave_out (default) runs a "
                             "subset stage's subset path, which leaves them out (a complete run is refused); "
                             "zero_fill only fills their images with zeros, as a model trained on all three would "
                             "naively be used")
    parser.add_argument("--postprocess", action="store_true",
                        help="keep only the largest 3-D connected component of the whole myocardium (scar and "
                             "edema outside it become background), in every label volume scored or written: the "
                             "original-grid prediction and the processed-grid one (scored without a readable "
                             "source label, by --protocol released, and drawn by --save_png)")
    parser.add_argument("--allow_preprocessing_mismatch", action="store_true",
                        help="score test data preprocessed with other settings than the training data (spacing, "
                             "crop size, intensity scaling, sequence order), with a warning instead of an error")
    parser.add_argument("--protocol", default="ours", choices=["ours", "released"],
                        help="released: also score the processed-grid predictions as the review release's test.py "
                             "does (HD95 in pixels; documentation/evaluation.md) -> summary_released_protocol.json")
    return parser


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
    """The source label mapped to classes 0-3, or None (with a warning) when the volume has no geometry or its
    source label is missing or unreadable. A source label of another shape than the recorded one is an error."""
    meta, geometry, case = volume["meta"], volume["geometry"], volume["case_name"]
    source = Path(meta.get("source_label", ""))
    problem = "no geometry in the volume" if geometry is None else None
    if problem is None and not source.is_file():
        problem = f"source label {source} not found"
    if problem is None:
        try:
            label = np.asarray(nib.load(str(source)).dataobj)
        except Exception as error:  # nibabel raises many types (format, gzip, EOF) for a damaged file
            problem = f"source label {source} is not readable ({error})"
    if problem is not None:
        logger.warning("%s: %s; scoring in the processed grid", case, problem)
        return None
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if label.shape != tuple(geometry.original_shape):
        raise DataError(f"{case}: source label {source} has shape {label.shape}, but the case was preprocessed from "
                        f"shape {tuple(geometry.original_shape)}: the file changed after preprocessing; restore it "
                        "or preprocess again")
    label_map = {int(k): v for k, v in json.loads(meta["label_map"]).items()}
    return map_labels(label, label_map, case, source)


def check_preprocessing(trained, tested, root, allow_mismatch, checkpoint_path):
    """The test data must be preprocessed as the training data was (each folder's dataset.json, or the review
    release's record for its Processed_data); a missing record is refused unless --allow_preprocessing_mismatch."""
    missing = []
    if trained is None:
        missing.append(f"{checkpoint_path} records no preprocessing (a run from before the record existed, trained "
                       "on a folder without dataset.json)")
    if tested is None:
        missing.append(f"{root} has no dataset.json (preprocess_data.py writes one) and is not the review release's "
                       "Processed_data layout")
    if missing:
        message = "the test data's preprocessing cannot be checked against the training data's: " + "; ".join(missing)
        if not allow_mismatch:
            raise DataError(message + ". Preprocess the test cases with preprocess_data.py, or pass "
                            "--allow_preprocessing_mismatch to score them unchecked")
        logger.warning("%s\n--allow_preprocessing_mismatch: scoring unchecked", message)
        return
    differences = preprocessing_differences(trained, tested)
    if not differences:
        return
    message = (f"{root} was preprocessed with other settings than the model's training data:\n  "
               + "\n  ".join(differences))
    if not allow_mismatch:
        raise DataError(message + "\nPreprocess the test cases with the training data's settings, or pass "
                        "--allow_preprocessing_mismatch to score them anyway")
    logger.warning("%s\n--allow_preprocessing_mismatch: scoring anyway", message)


def postprocessed(labels, args):
    """``labels`` with only the largest connected myocardium kept (--postprocess), else as they are."""
    return keep_largest_myocardium(labels) if args.postprocess else labels


def load_members(args, device):
    """[(checkpoint path, checkpoint, inference model)] of the run and of each --ensemble run, checked against the
    command line's flags."""
    members = []
    for path in ensemble_checkpoints([args.run_dir, *args.ensemble], args.checkpoint, "--ensemble"):
        checkpoint = load_checkpoint(path, map_location="cpu")
        check_flags_against(checkpoint["spec"], args)
        if "fused" in args.heads:
            check_fused_head_trained(checkpoint, path)
        model = inference_model(checkpoint, path, device)
        if tuple(args.sequences) != MODALITIES:
            if args.missing == "leave_out":
                check_subset_trained(checkpoint, path, args.sequences)  # a subset stage, then
                if args.heads != ("fused",):
                    raise CheckpointError(f"{path}: a subset stage serves the fused head alone on a subset of the "
                                          f"sequences; --heads {','.join(args.heads)} needs all three")
            model = SequenceSubset(model, args.sequences, leave_out=args.missing == "leave_out")
        if args.heads != ("fused",):
            if checkpoint["spec"]["model"] != "immseg":
                raise CheckpointError(f"{path}: --heads {','.join(args.heads)} needs I-MMSeg's modality heads; this "
                                      f"{checkpoint['spec']['model']} checkpoint has one head (leave --heads out)")
            model = HeadAverage(model, args.heads)
        members.append((path, checkpoint, model))
    return members


def score_case(volume, members, args, ctx, out_dir):
    """Predict and score one volume and write its outputs: (case, its metrics.csv rows, metrics, space, the
    release's metrics or None)."""
    case = volume["case_name"]
    probabilities = ensemble_probabilities([model for _, _, model in members], volume["image"],
                                           [member["spec"]["img_size"] for _, member, _ in members],
                                           args.batch_slices, ctx.device, args.amp, args.tta)
    processed_prediction = postprocessed(probabilities.argmax(dim=0).numpy().astype(np.uint8), args)
    released = (released_case_metrics(processed_prediction, volume["label"].numpy())
                if args.protocol == "released" else None)
    reference = reference_in_original_space(volume)
    geometry = volume["geometry"]
    # The exported prediction lies in the patient's geometry whenever the volume records it, label or not.
    exported, affine = ((postprocessed(probabilities_to_original(probabilities.numpy(), geometry), args),
                         geometry.affine_array)
                        if geometry is not None else (processed_prediction, np.eye(4)))
    if reference is not None:
        prediction, spacing, space = exported, geometry.original_spacing, "original"
    else:
        prediction, reference = processed_prediction, volume["label"].numpy()
        spacing = geometry.processed_spacing if geometry is not None else (1.0, 1.0, 1.0)
        space = "processed" if geometry is not None else "voxels"
    metrics = case_metrics(prediction, reference, spacing)
    rows = [{"case": case, "structure": name, "dice": dice, "hd95": hd, "space": space}
            for name, (dice, hd) in metrics.items()]
    if args.save_nii:
        save_nifti(exported, affine, out_dir / f"{case}_pred.nii.gz")
    if args.save_png:
        save_overlay(out_dir / f"{case}.png", case, volume["image"].numpy(), processed_prediction,
                     volume["label"].numpy(), class_dice(metrics), f"scored in the {space} space, drawn in the "
                     "processed grid", unused=[name for name in MODALITIES if name not in args.sequences])
    logger.info("%s (%s space): %s", case, space, ", ".join(
        f"{name} {dice:.3f}/{hd:.2f}{HD95_UNITS[space]}" for name, (dice, hd) in metrics.items()))
    return case, rows, metrics, space, released


def parse_evaluation_args(argv=None, description=__doc__):
    """test.py's arguments from ``argv``, with the run folder they name (``run_dir``)."""
    parser = evaluation_parser(description)
    args, unknown = parser.parse_known_args(argv)
    args.ignored_training_flags = training_flags(parser, unknown)
    hidden_heads = [head for head in args.heads if head != "fused" and head not in args.sequences]
    if hidden_heads:
        parser.error(f"--heads {','.join(args.heads)}: the head of {', '.join(hidden_heads)} sees a sequence that "
                     f"--sequences {','.join(args.sequences)} hides")
    args.run_dir = Path(args.output_dir) if args.output_dir else run_directory(filled(args))
    return args


def training_flags(parser, arguments):
    """The command-line words test.py does not know, checked against train.py's flags: those of a training command
    (--augmentation strong, --compile on, ...) are returned to be logged as ignored; anything else is an error."""
    if not arguments:
        return []
    training = training_parser()
    training.exit_on_error = False
    try:
        _, unknown = training.parse_known_args(arguments)
    except argparse.ArgumentError as error:
        parser.error(f"train.py's {error}")
    if unknown:
        parser.error(f"unrecognized arguments (neither test.py's nor train.py's flags): {' '.join(unknown)}")
    return arguments


def open_test_data(args, members):
    """The volumes to score and where the results go: (dataset, its root, the results setting, the folder), the
    test data checked against each member's preprocessing and the folder against another setting's results."""
    _, checkpoint, _ = members[0]
    # Without --root_path, the training run's data and list folder (the release's lists live apart from its data).
    trained_with = checkpoint["args"]
    root = args.root_path or Path(trained_with["root_path"])
    list_dir = args.list_dir or (root if args.root_path else Path(trained_with.get("list_dir") or root))
    dataset = MyoPSDataset(root, list_dir, args.split)
    if len(dataset) == 0:
        raise DataError(f"the {args.split} list in {list_dir} names no volumes: nothing to score "
                        "(preprocess_data.py writes validation cases with --val_fraction or --split_file)")
    for path, member, _ in members:
        logger.info("checkpoint %s (epoch %d)", path, member["train_state"]["epoch"])
        check_preprocessing(member.get("preprocessing"), read_preprocessing(root), root,
                            args.allow_preprocessing_mismatch, path)
    setting = results_setting(args, members, root)
    out_dir = args.test_save_dir or args.run_dir / results_folder_name(args, len(members))
    check_results_folder(out_dir, setting, args.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("%d checkpoint(s), %d %s volumes from %s -> %s", len(members), len(dataset), args.split, root,
                out_dir)
    return dataset, setting, out_dir


def score_cases(dataset, members, args, ctx, out_dir):
    """Score every volume until a stop is requested; a case that fails is left out and named, never stops the
    others. Returns (metrics.csv rows, per-case metrics, {case: space}, {case: release's metrics}, {case: why})."""
    rows, per_case, spaces, released, failures = [], [], {}, {}, {}
    for index in range(len(dataset)):
        if args.stop.signal_number:
            logger.warning("%s: scoring stopped after %d of %d cases; the outputs hold the cases scored",
                           signal.Signals(args.stop.signal_number).name, index, len(dataset))
            break
        case = dataset.sample_list[index]
        try:
            case, case_rows, metrics, space, released_metrics = score_case(dataset[index], members, args, ctx,
                                                                           out_dir)
        except Exception as error:  # noqa: BLE001 - one case's failure, whatever it is, never stops the others
            reason = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
            logger.error("%s: left out: %s", case, reason)
            logger.debug("%s failed", case, exc_info=True)
            failures[case] = reason
            continue
        rows += case_rows
        per_case.append(metrics)
        spaces[case] = space
        if released_metrics is not None:
            released[case] = released_metrics
    if not per_case:
        raise DataError(f"no case of {args.split} could be scored: " + "; ".join(
            f"{case}: {reason}" for case, reason in failures.items()))
    return rows, per_case, spaces, released, failures


def write_scores(out_dir, rows, per_case, spaces, failures, args):
    """metrics.csv and summary.json; the summary."""
    summary = summarise(per_case)
    for entry in summary.values():
        entry.update(space="/".join(sorted(set(spaces.values()))),
                     hd95_unit="/".join(sorted({HD95_UNITS[space] for space in spaces.values()})),
                     tta=args.tta, postprocess=args.postprocess, n_left_out=len(failures))
    with atomic_path(out_dir / "metrics.csv") as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case", "structure", "dice", "hd95", "space"])
            writer.writeheader()
            writer.writerows(rows)
    with atomic_path(out_dir / "summary.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate(args):
    """Score the run (and its --ensemble) on the --split volumes into the results folder: (summary, failures)."""
    ctx = setup_distributed(args.device)
    resolve_device_defaults(args, ctx.device)
    seed_everything(1234 if args.seed is None else args.seed, args.deterministic)
    warn_if_bf16_is_emulated(ctx.device, args.amp, logger)
    members = load_members(args, ctx.device)
    args.checkpoint_path, checkpoint, _ = members[0]
    dataset, setting, out_dir = open_test_data(args, members)
    start = time.time()
    rows, per_case, spaces, released, failures = score_cases(dataset, members, args, ctx, out_dir)
    summary = write_scores(out_dir, rows, per_case, spaces, failures, args)
    info = {**setting, "epoch": checkpoint["train_state"]["epoch"], "space": spaces, "left_out": failures,
            "stopped_after": len(per_case) + len(failures) if args.stop.signal_number else None,
            "spec": checkpoint["spec"], "seconds": round(time.time() - start, 2),
            "structures": {k: list(v) for k, v in STRUCTURES.items()}, "not_measurable": not_measurable(args.sequences)}
    with atomic_path(out_dir / "test_info.json") as temporary:
        temporary.write_text(json.dumps(info, indent=2, default=str) + "\n")
    write_test_page(out_dir, info, summary, rows)
    logger.info("scored in the %s space (tta %s, postprocess %s)\n%s", "/".join(sorted(set(spaces.values()))),
                args.tta, args.postprocess, format_table(summary, info["not_measurable"]))
    if args.protocol == "released":
        write_released_protocol(released, out_dir, {"tta": args.tta, "postprocess": args.postprocess})
    if failures:
        logger.error("%d of %d cases could not be scored and are left out of the summary (n_left_out):\n  %s",
                     len(failures), len(dataset), "\n  ".join(f"{case}: {reason}" for case, reason in failures.items()))
    return summary, failures


def run_evaluation(args):
    """test.py's run: score as ``args`` (from :func:`parse_evaluation_args`) say. The exit code: 0 every case
    scored, 1 an error the log names or a case left out, 128 + N stopped by signal N."""
    configure_logging()
    if getattr(args, "ignored_training_flags", None):
        logger.info("train.py's flags that testing does not use, ignored: %s", " ".join(args.ignored_training_flags))
    try:
        with torch.inference_mode(), StopRequest("case") as args.stop:
            _, failures = evaluate(args)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 1
    if args.stop.signal_number:
        return 128 + args.stop.signal_number
    return 1 if failures else 0
