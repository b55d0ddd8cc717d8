"""What a training run is made of before its loop: train.py's flags, the model and text priors a run builds, and
its run folder opened (trainer.train runs the loop; the benchmarks call the same functions)."""
import argparse
import logging
from pathlib import Path

import numpy as np

from datasets.dataset_myops import AUGMENTATIONS
from engine.checkpoint_writer import remove_interrupted_writes
from networks.vit_seg_configs import DEFAULT_PRETRAINED_PATH
from networks.vit_seg_modeling import build_model
from priors import DEFAULT_PROMPTS, resolve_priors
from engine.checkpoints import CheckpointError, model_spec
from engine.options import (CUDA_DEFAULTS, ROOT, add_run_arguments, build_config, filled, fit_stages, run_directory,
                            sequence_list)
from engine.runs import clear_run_folder, configure_logging, resumes_from_folder
from engine.subset_stage import SOFT_TARGET_WEIGHT, STAGE_BASE_LR, complete_stage_arguments

logger = logging.getLogger("train")


def training_parser(description=__doc__):
    """train.py's flags: the run flags (engine.options) and the training's own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--n_gpu", type=int, default=None,
                        help="released code's GPU count (it assumed 2); superseded by torchrun's world size")
    parser.add_argument("--region_fusion_start_epoch", type=int, default=None,
                        help="epoch (from 0) from which the fused head is trained (default 100; an I-MMSeg run of "
                             "100 epochs or fewer gets a third of its epochs, the paper's 100 of 300)")
    parser.add_argument("--start_contrast_epoch", type=int, default=None,
                        help="epoch (from 0) from which the contrastive loss is on (default 20; fitted alike, the "
                             "paper's 20 of 300)")
    parser.add_argument("--contrast_sample_num", type=int, default=10,
                        help="pixels sampled per image and class: 5, 2, 1 times this at H/2, H/4, H/8")
    parser.add_argument("--contrast_w", type=float, default=0.1, help="contrastive loss weight")
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--input_sequences", type=sequence_list, default=None,
                        help="with --model transunet_early: the sequences stacked as its channels, comma-separated "
                             "(e.g. bSSFP,LGE: early fusion for patients without T2w; default all three)")
    parser.add_argument("--subsets_from", type=Path, default=None, metavar="RUN_OR_CHECKPOINT",
                        help="the subset stage: on a finished I-MMSeg run (its folder: best.pth, else last.pth; or a "
                             "checkpoint file), frozen, train only new parameters for the 6 proper subsets of the "
                             "sequences (documentation/missing_sequences.md). The model comes from the checkpoint; "
                             "data, batch size, augmentation and budget too unless given; --base_lr "
                             f"{STAGE_BASE_LR} unless given. Default --output_dir: <run>_subsets")
    parser.add_argument("--soft_target_weight", type=float, default=None,
                        help="with --subsets_from: weight of the complete view's class probabilities as soft targets "
                             f"of the subset view (KL divergence), beside the labels (default {SOFT_TARGET_WEIGHT})")
    parser.add_argument("--dice_class_weights", type=class_weight_list, default=None,
                        help="soft Dice weight of each class, comma-separated, e.g. 0.5,1,2,1 to weight scar twice "
                             "(default: method.md's 0.5 for the background, 1 for the other classes)")
    parser.add_argument("--augmentation", default="paper", choices=list(AUGMENTATIONS),
                        help="augmentation ranges: method.md's, wider ones for small datasets, or the wider ones "
                             "with nnU-Net's elastic deformation, contrast and blur")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="data loading processes per training process (default: on a GPU the process's share "
                             "of the cores less one, 2 to 8; 2 on the CPU)")
    parser.add_argument("--compile", default="auto", choices=["auto", "off", "on"],
                        help="torch.compile the model's repeated regions and the loss; a failed compilation warns "
                             f"and trains eagerly. auto: {CUDA_DEFAULTS['compile']} on a GPU, off on the CPU")
    parser.add_argument("--log_every", type=int, default=None,
                        help="read the loss from the device every N steps (progress bar, TensorBoard, non-finite "
                             "check; always before a save); default 25 on a GPU, 1 on the CPU")
    parser.add_argument("--pretrained_path", type=Path, default=ROOT / DEFAULT_PRETRAINED_PATH,
                        help="Google's R50-ViT-B_16.npz (ImageNet-21k); missing is an error unless --no_pretrain")
    parser.add_argument("--prior_embeddings", type=Path, default=None,
                        help="prior file; created with --prior_encoder when absent "
                             "(default: priors/embeddings/<encoder>_<prompt set>.pt)")
    parser.add_argument("--prior_encoder", default="biomedclip",
                        help="text encoder for the priors: biomedclip (default), offline, hf-hub:..., open_clip:...")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="prompt set JSON")
    parser.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' (the run's last.pth)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run folder that holds an earlier run: delete its checkpoints, "
                             "config.json, log.txt, log/ and test_*/ results first (other files stay)")
    parser.add_argument("--val_every", type=int, default=10, help="validate on val.txt every N epochs")
    parser.add_argument("--save_every", type=int, default=20, help="keep epoch_N.pth every N epochs")
    parser.add_argument("--batch_slices", type=int, default=16, help="slices per batch during validation")
    parser.add_argument("--image_every", type=int, default=50, help="TensorBoard images every N iterations")
    parser.add_argument("--progress", type=int, default=1, help="1: progress bars")
    return parser


def parse_training_args(argv=None, description=__doc__):
    """train.py's arguments from ``argv``, checked, the run defaults filled in and the stages fitted."""
    parser = training_parser(description)
    args = parser.parse_args(argv)
    if args.log_every is not None and args.log_every < 1:
        parser.error(f"--log_every must be at least 1, got {args.log_every}")
    args = filled(args)
    check_subset_stage(parser, args, argv)
    if args.overwrite and args.resume and (args.resume == "auto" or resumes_from_folder(
            args.resume, args.output_dir or run_directory(args))):
        parser.error("--overwrite deletes the checkpoints that --resume continues from: give one of them")
    args.fitted_stages = fit_stages(args)
    if args.input_sequences is not None and args.model != "transunet_early":
        parser.error(f"--input_sequences goes with --model transunet_early (I-MMSeg: a subset stage, --subsets_from; "
                     f"transunet_single: --modality), not --model {args.model}")
    if args.dice_class_weights is not None and len(args.dice_class_weights) != args.num_classes:
        parser.error(f"--dice_class_weights: {len(args.dice_class_weights)} weights for --num_classes "
                     f"{args.num_classes}; give one per class")
    return args


def typed_flags(argv):
    """The destinations of the flags given in ``argv`` (None: the command line), defaults left out."""
    probe = training_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv)[0]))


def check_subset_stage(parser, args, argv):
    """--subsets_from: the flags checked against the complete run and completed from it (engine.subset_stage);
    --soft_target_weight only with it."""
    if args.subsets_from is None:
        if args.soft_target_weight is not None:
            parser.error("--soft_target_weight goes with --subsets_from (the subset stage)")
        return
    if args.soft_target_weight is None:
        args.soft_target_weight = SOFT_TARGET_WEIGHT
    if not args.soft_target_weight >= 0:
        parser.error(f"--soft_target_weight must be a non-negative weight, got {args.soft_target_weight}")
    try:
        complete_stage_arguments(args, typed_flags(argv))
    except (CheckpointError, ValueError) as error:
        parser.error(str(error))


def class_weight_list(text):
    """``0.5,1,2,1`` -> [0.5, 1.0, 2.0, 1.0]: non-negative numbers, at least one positive."""
    try:
        weights = [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.5,1,2,1") from None
    if not all(np.isfinite(weight) and weight >= 0 for weight in weights) or not any(weights):
        raise argparse.ArgumentTypeError(f"{text!r}: weights must be finite, non-negative and not all zero")
    return weights


def prepare_priors(args, ctx):
    """The text priors for I-MMSeg with text priors on, created by rank 0 if the file is absent."""
    if args.model != "immseg" or args.no_text_prior:
        return None
    if ctx.is_main:
        priors, path = resolve_priors(args.prior_embeddings, args.prior_encoder, args.prompts)
    ctx.barrier()
    if not ctx.is_main:
        priors, path = resolve_priors(args.prior_embeddings, args.prior_encoder, args.prompts)
    args.prior_embeddings = path
    return priors


def build(args, ctx):
    priors = prepare_priors(args, ctx)
    config = build_config(args, text_dim=priors.dim if priors is not None else None)
    model = build_model(args.model, config, args.img_size, args.num_classes,
                        priors.intensity if priors is not None else None,
                        priors.classes if priors is not None else None, args.modality, args.input_sequences)
    if not args.no_pretrain:
        if not args.pretrained_path.is_file():
            raise FileNotFoundError(f"pretrained weights {args.pretrained_path} do not exist: place Google's "
                                    "R50-ViT-B_16.npz there, pass --pretrained_path, or train with --no_pretrain")
        loaded = model.load_from(np.load(args.pretrained_path), source=str(args.pretrained_path))
        logger.info("loaded %d tensors from %s", loaded, args.pretrained_path)
    return model, model_spec(args, config), priors


def open_run_folder(run_dir, overwrite, ctx):
    """Create the run folder (clearing an earlier run's files with --overwrite) and log into it."""
    if ctx.is_main:
        if overwrite:
            removed = clear_run_folder(run_dir) if run_dir.is_dir() else []
            if removed:
                logger.warning("--overwrite: deleted %s", ", ".join(str(path) for path in removed))
        run_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    configure_logging(run_dir, ctx.is_main)
    if ctx.is_main:
        for path in remove_interrupted_writes(run_dir):
            logger.warning("removed %s, a checkpoint write cut short by a killed process (the files it would have "
                           "replaced are whole)", path)
