"""What a subset stage is made of before its loop (train.py --subsets_from; documentation/missing_sequences.md):
the complete run's checkpoint found, checked and identified (path and SHA-256), train.py's flags checked against it
and completed from it, and the stage's model and specification. subset_trainer.py trains it."""
import logging
from pathlib import Path

from datasets.preprocessing_record import preprocessing_differences, read_preprocessing
from engine.checkpoints import (CheckpointError, check_fused_head_trained, load_checkpoint, load_model_state,
                                model_from_spec, resolve_checkpoint)
from engine.options import ABLATIONS
from networks.convert_release import file_sha256
from networks.subset_stage import SubsetIMMSeg
from networks.vit_seg_configs import with_switch_defaults

logger = logging.getLogger("train")

# what the stage adds (networks.subset_stage); a checkpoint of another design would not load
SUBSET_STAGE_DESIGN = "mean stand-ins, per-subset scale and shift/1"

# --soft_target_weight's default: the labels lead, the complete view's probabilities guide (not tuned)
SOFT_TARGET_WEIGHT = 0.5

# the stage's --base_lr when not given: five times the recipe's, for a few parameters that start at the identity
# (screened on the benchmark's fold 0 against the recipe's 0.001, then measured on its 3 folds:
# documentation/missing_sequences.md)
STAGE_BASE_LR = 0.005

# flags that define the model: the complete run's; given, they must say what it has
MODEL_FLAGS = ("model", "vit_name", "img_size", "num_classes", "n_skip", "vit_patches_size", *ABLATIONS)
# flags of the complete run that the stage takes when not given (and its data without --dataset or --root_path)
INHERITED_FLAGS = ("batch_size", "augmentation", "dice_class_weights", "max_epochs", "max_iterations")
# flags that choose what the stage does not train (the complete model and its schedule, priors and weights)
NOT_APPLICABLE = ("input_sequences", "modality", "region_fusion_start_epoch", "start_contrast_epoch",
                  "contrast_sample_num", "contrast_w", "pretrained_path", "prior_embeddings", "prior_encoder",
                  "prompts")


def complete_checkpoint_path(source):
    """The checkpoint of --subsets_from: a run folder's best.pth, else its last.pth; or a checkpoint file."""
    source = Path(source)
    return resolve_checkpoint(source) if source.is_dir() else source


def load_complete_run(source):
    """(path, checkpoint) of the complete I-MMSeg run named by --subsets_from; a baseline, a subset stage or a run
    whose fused head never trained is refused."""
    path = complete_checkpoint_path(source)
    checkpoint = load_checkpoint(path, map_location="cpu")
    spec = checkpoint["spec"]
    if spec.get("subset_stage") is not None:
        raise CheckpointError(f"--subsets_from {source}: {path} is a subset stage already; give the complete run it "
                              f"was trained on ({(checkpoint.get('complete_run') or {}).get('checkpoint')})")
    if spec["model"] != "immseg":
        raise CheckpointError(f"--subsets_from {source}: {path} is a {spec['model']} run; the subset stage adds to "
                              "an I-MMSeg run (--model immseg), whose encoders see one sequence each")
    check_fused_head_trained(checkpoint, path)
    return path, checkpoint


def default_output_dir(source):
    """The stage's run folder beside the complete run's: <run>_subsets, or <run>_subsets_<checkpoint> when
    --subsets_from names a checkpoint file."""
    source = Path(source)
    if source.is_dir():
        return source.parent / f"{source.name}_subsets"
    return source.parent.parent / f"{source.parent.name}_subsets_{source.stem}"


def model_flag_values(spec):
    """The complete run's value of each of MODEL_FLAGS, from its specification."""
    config = with_switch_defaults(spec["config"])
    values = {"model": spec["model"], "vit_name": config.get("name"), "img_size": spec["img_size"],
              "num_classes": spec["num_classes"], "n_skip": config.get("n_skip"),
              "vit_patches_size": list(config.get("patches", {}).get("size", [16]))[0]}
    values.update({flag: not config.get(switch, True) for flag, switch in ABLATIONS.items()})
    return values


def complete_stage_arguments(args, given):
    """Check train.py's ``args`` of a subset stage against the complete run (``given``: the flags typed) and fill in
    what the stage takes from it; a ValueError names every flag that contradicts the run or does not apply."""
    path, checkpoint = load_complete_run(args.subsets_from)
    trained = model_flag_values(checkpoint["spec"])
    problems = [f"--{name} {getattr(args, name)} (the complete run {path} has {trained[name]})"
                for name in MODEL_FLAGS if name in given and getattr(args, name) != trained[name]]
    problems += [f"--{name} (the stage keeps the complete run's model, priors and schedule)"
                 for name in NOT_APPLICABLE if name in given]
    if "compile" in given and args.compile == "on":
        problems.append("--compile on (the stage's per-subset hooks run eagerly)")
    if problems:
        raise ValueError("--subsets_from: flags contradict the complete run or do not apply to the subset stage: "
                         + "; ".join(problems) + ". Leave them out: the stage takes the model from the checkpoint.")
    recorded = checkpoint.get("args") or {}
    for name, value in trained.items():
        setattr(args, name, value)
    for name in INHERITED_FLAGS + ("dataset",):
        if name not in given and name in recorded:
            setattr(args, name, recorded[name])
    if not {"dataset", "root_path"} & given and recorded.get("root_path"):  # the complete run's training data
        args.root_path = Path(recorded["root_path"])
        if "list_dir" not in given:
            args.list_dir = Path(recorded.get("list_dir") or recorded["root_path"])
    if "base_lr" not in given:
        args.base_lr = STAGE_BASE_LR
    args.start_contrast_epoch = args.region_fusion_start_epoch = 0  # one loss from the first step
    args.compile = "off"
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.subsets_from)
    return args


def complete_run_identity(path, checkpoint):
    """What a stage records of its complete run: the checkpoint file (path, SHA-256), its specification, its
    position in training and its commit."""
    return {"checkpoint": str(Path(path).resolve()), "sha256": file_sha256(path), "spec": checkpoint["spec"],
            "train_state": checkpoint.get("train_state"), "git_commit": checkpoint.get("git_commit")}


def stage_spec(complete_spec, complete_sha256):
    """The stage's model specification: the complete run's, with the subset stage's design and the complete
    checkpoint's hash (a resumed stage must continue on the same complete model)."""
    config = with_switch_defaults(complete_spec["config"]).to_dict()
    return {**complete_spec, "config": config,
            "subset_stage": {"design": SUBSET_STAGE_DESIGN, "complete_sha256": complete_sha256}}


def subset_stage_model(checkpoint, path):
    """The complete run's model, its weights loaded, frozen inside a SubsetIMMSeg with new subset parameters."""
    complete = model_from_spec(checkpoint["spec"], checkpoint["model"])
    load_model_state(complete, checkpoint["model"], path)
    return SubsetIMMSeg(complete)


def check_stage_data(root_path, checkpoint, path):
    """The stage's training data must be preprocessed as the complete run's was (its checkpoint's record)."""
    trained, here = checkpoint.get("preprocessing"), read_preprocessing(root_path)
    if trained is None or here is None:
        logger.warning("the preprocessing of %s cannot be compared with the complete run's (%s): one of them "
                       "records none", root_path, path)
        return
    differences = preprocessing_differences(trained, here)
    if differences:
        raise ValueError(f"{root_path} was preprocessed with other settings than the complete run {path}'s "
                         "training data:\n  " + "\n  ".join(differences)
                         + "\nTrain the stage on data preprocessed as the complete run's")
