"""The checkpoint format: what a checkpoint holds, the model specification it records, loading (the one guard for
a torch file), and resolving a checkpoint name in a run folder.

A checkpoint holds everything needed to continue exactly: weights (unwrapped from DDP), optimizer, grad scaler,
epoch, iteration and position in the epoch, best metric, the per-epoch history, every rank's RNG states, the model
specification (configuration included), the arguments, the prior file's provenance, the training data's
preprocessing record and the git commit.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import ml_collections
import torch

from datasets.vocabulary import MODALITIES
from networks.inference import fuse_for_inference
from networks.subset_stage import SubsetIMMSeg, complete_weights
from networks.vit_seg_modeling import build_model


CHECKPOINT_FORMAT = "immseg-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another configuration."""


def model_spec(args, config):
    spec = {"model": args.model, "modality": args.modality if args.model == "transunet_single" else None,
            "img_size": args.img_size, "num_classes": args.num_classes, "config": config.to_dict()}
    if getattr(args, "input_sequences", None) is not None:
        spec["input_sequences"] = list(args.input_sequences)  # early fusion on a subset (absent: all three)
    return spec


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def spec_differences(expected, found):
    flat_expected, flat_found = _flatten(expected), _flatten(found)
    return [f"{key}: {flat_found.get(key)!r} in the checkpoint, {flat_expected.get(key)!r} here"
            for key in sorted(set(flat_expected) | set(flat_found)) if flat_expected.get(key) != flat_found.get(key)]


def model_from_spec(spec, state_dict=None, intensity_priors=None, class_embeddings=None):
    """The model a specification describes (a subset stage's: the complete model inside a SubsetIMMSeg), its text
    priors taken from ``state_dict`` when not given."""
    if spec.get("subset_stage") is not None:
        complete_spec = {key: value for key, value in spec.items() if key != "subset_stage"}
        complete_state = None if state_dict is None else complete_weights(state_dict)
        return SubsetIMMSeg(model_from_spec(complete_spec, complete_state, intensity_priors, class_embeddings))
    config = ml_collections.ConfigDict(spec["config"])
    if spec["model"] == "immseg" and config.use_text_prior and intensity_priors is None and state_dict is not None:
        intensity_priors, class_embeddings = state_dict["intensity_priors"], state_dict["class_embeddings"]
    return build_model(spec["model"], config, spec["img_size"], spec["num_classes"], intensity_priors,
                       class_embeddings, spec["modality"] or "LGE", spec.get("input_sequences"))


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is not readable: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format {CHECKPOINT_FORMAT})")
    return checkpoint


def check_fused_head_trained(checkpoint, path):
    """Refuse an I-MMSeg checkpoint saved before its fused head (the one used for prediction) ever trained: a run
    stopped before --region_fusion_start_epoch. Checkpoints that do not record the stage (converted) pass."""
    start = (checkpoint.get("args") or {}).get("region_fusion_start_epoch")
    if checkpoint["spec"]["model"] != "immseg" or start is None:
        return
    state = checkpoint.get("train_state") or {}
    started_epochs = state.get("epoch", 0) + (1 if state.get("epoch_iteration", 0) else 0)
    if started_epochs <= start:
        raise CheckpointError(
            f"{path} was saved after {state.get('epoch', 0)} epochs, before its fused head, the one used for "
            f"prediction, started training in epoch {start + 1} (--region_fusion_start_epoch {start}, counted from "
            "0): its predictions would come from an untrained head. Continue the run (train.py with its flags, "
            f"--resume auto and a --max_epochs above {start}), or use a checkpoint saved after epoch {start + 1}")


def serves_subsets(record):
    """Whether the run that wrote ``record`` (a checkpoint, or its run's config.json read as a dict) segments a
    subset of the sequences: a subset stage (train.py --subsets_from)."""
    return (record.get("spec") or {}).get("subset_stage") is not None


def check_subset_trained(record, path, sequences):
    """A model asked to segment from a subset of the sequences must be a subset stage (``record``: its checkpoint,
    or a dict with the checkpoint's spec and args); all three sequences need no check. A complete run is refused
    with what serves it, and so is a run of a training mode for subsets that has since been removed (its
    ``args``: sequence dropout, whose records stay in benchmarks/results/missing_sequences/)."""
    missing = [name for name in MODALITIES if name not in sequences]
    if not missing or serves_subsets(record):
        return
    removed = ((record.get("args") or {}).get("sequence_dropout") or 0) > 0
    kind = ("was trained with --sequence_dropout, a training mode that has been removed," if removed
            else "is a complete run")
    raise CheckpointError(f"{path} {kind} and needs all of {', '.join(MODALITIES)}; it cannot segment without "
                          f"{', '.join(missing)}: train a subset stage on it (train.py --subsets_from RUN), which "
                          "serves any subset and keeps complete cases as they are")


def load_model_state(model, state_dict, source):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not fit the model: {error}") from None


def resolve_checkpoint(run_dir, name=None):
    """A checkpoint given as a file or as a name in the run folder (best, last, epoch_N); default best, else last."""
    run_dir = Path(run_dir)
    if name is None:
        best = run_dir / "best.pth"
        return best if best.is_file() else run_dir / "last.pth"
    path = Path(name)
    if path.is_file() or path.suffix == ".pth" or len(path.parts) > 1:
        return path
    return run_dir / f"{name}.pth"


def ensemble_checkpoints(runs, name, flag):
    """The checkpoint of each run (``resolve_checkpoint``); one file named twice is refused, since it would weigh
    double in the ensemble. ``flag`` names the command-line option the runs came from."""
    paths = [resolve_checkpoint(run, name) for run in runs]
    resolved = [path.resolve() for path in paths]
    repeated = sorted({str(path) for path in resolved if resolved.count(path) > 1})
    if repeated:
        raise CheckpointError(f"{flag} {' '.join(map(str, runs))}: the checkpoint {', '.join(repeated)} would enter "
                              "the ensemble more than once; give different runs, and with several runs a checkpoint "
                              "name (best, last, epoch_N) rather than a file")
    return paths


def inference_model(checkpoint, source, device):
    """The checkpoint's model as an inference copy on ``device`` (eval mode, normalisation folded)."""
    model = model_from_spec(checkpoint["spec"], checkpoint["model"])
    load_model_state(model, checkpoint["model"], source)
    return fuse_for_inference(model.to(device))


def newest_epoch_checkpoint(run_dir, exclude=None):
    """The epoch_N.pth of a run folder with the largest N (other than ``exclude``), or None."""
    numbered = [(int(path.stem[len("epoch_"):]), path) for path in Path(run_dir).glob("epoch_*.pth")
                if path.stem[len("epoch_"):].isdigit() and path != exclude]
    return max(numbered)[1] if numbered else None


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    iteration: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    epoch_iteration: int = 0  # steps done in the epoch in progress (non-zero only in an interrupted checkpoint)
    # per completed epoch: {epoch, loss, terms, lr, val_dice, weights}, the curves of progress.png, and the loss sums
    # of the epoch in progress (engine/progress.py); empty in checkpoints written before they were kept
    history: list = field(default_factory=list)
    epoch_losses: dict = field(default_factory=dict)
