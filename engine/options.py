"""The run flags: the released scripts' flags that name a run and define its model, their defaults by device,
the run folder's name and the model configuration they define."""
import argparse
import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.vocabulary import MODALITIES, dataset_name
from networks.vit_seg_configs import get_config
from networks.inference import cuda_has_bf16_kernels
from networks.vit_seg_modeling import MODEL_NAMES

ROOT = Path(__file__).resolve().parent.parent

DATASET_ROOTS = {"Myops": "data/MyoPS380", "MyoPS2020": "data/MyoPS2020", "Phantom": "data/Phantom"}


# Flags that name a run and define its model; test.py leaves them unset (None) unless given, so that only
# what the user actually typed is compared with a checkpoint.
RUN_DEFAULTS = {"dataset": "Myops", "num_classes": 4, "max_iterations": None, "max_epochs": 300,
                "batch_size": 24, "base_lr": 0.001, "img_size": 128, "seed": 1234, "n_skip": 3,
                "vit_name": "R50-ViT-B_16", "vit_patches_size": 16, "model": "immseg", "modality": "LGE"}


ABLATIONS = {"no_cmfe": "use_cmfe", "no_cfm": "use_cfm", "no_contrast": "use_contrast",
             "no_text_prior": "use_text_prior"}


# What an unset --amp, --deterministic and --compile mean on a GPU (documentation/speed.md says on what evidence;
# --compile stays opt-in until benchmarks/gpu_speed.sh has measured what it costs and saves)
CUDA_DEFAULTS = {"amp": "bf16", "deterministic": 0, "compile": "off"}


@dataclass(frozen=True)
class DevicePath:
    """How training lays out its work on a device. The GPU's path: channels_last convolutions (cuDNN's fastest) and
    contrastive sampling of a fixed size, which never waits for the device to count the pixels it found; the CPU's:
    the plain layout and sampling that drops the empty slots (counting costs nothing there). The tests run the
    GPU's path on the CPU (``device_path`` patched), so that every line of it runs before a GPU sees it."""
    channels_last: bool
    fixed_size_contrast: bool


GPU_PATH = DevicePath(channels_last=True, fixed_size_contrast=True)
CPU_PATH = DevicePath(channels_last=False, fixed_size_contrast=False)


def device_path(device):
    """GPU_PATH on a CUDA device, CPU_PATH elsewhere."""
    return GPU_PATH if torch.device(device).type == "cuda" else CPU_PATH


def resolve_device_defaults(args, device):
    """Fill the flags whose default depends on the device: --amp, --deterministic (and --compile, --num_workers,
    --log_every where the script has them). --amp auto is bf16 on a GPU that computes it natively, float32 on
    the others (V100 and T4 only emulate bf16; --amp fp16 is their fast choice) and on CPUs. Returns ``args``,
    changed in place."""
    cuda = torch.device(device).type == "cuda"
    if getattr(args, "amp", None) in (None, "auto"):
        args.amp = CUDA_DEFAULTS["amp"] if cuda and cuda_has_bf16_kernels(device) else "none"
    if getattr(args, "deterministic", None) is None:
        args.deterministic = CUDA_DEFAULTS["deterministic"] if cuda else 1
    if getattr(args, "compile", "absent") in (None, "auto"):
        args.compile = CUDA_DEFAULTS["compile"] if cuda else "off"
    if hasattr(args, "num_workers") and args.num_workers is None:
        args.num_workers = loader_workers(cuda)
    if hasattr(args, "log_every") and args.log_every is None:
        args.log_every = 25 if cuda else 1
    return args


def loader_workers(cuda):
    """Loader processes per training process: on a GPU the cores of this process's share of the machine, less
    one for the training process itself, from 2 to 8; on the CPU 2 (the cores compute the model)."""
    if not cuda:
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(2, min(8, cores // processes - 1))


def add_run_arguments(parser, with_defaults=True):
    """The released scripts' flags that name a run and define its model, plus the model choice and ablations."""
    default = (lambda name: RUN_DEFAULTS[name]) if with_defaults else (lambda name: None)
    parser.add_argument("--dataset", default=default("dataset"), type=dataset_name("Myops"),
                        choices=sorted(DATASET_ROOTS),
                        help="dataset name, used for run naming and the default --root_path (default Myops, which "
                             "preprocess_data.py calls MyoPS380: both are accepted)")
    parser.add_argument("--root_path", type=Path, default=None,
                        help="preprocessed folder holding bSSFP/, LGE/, T2w/ and the lists "
                             "(default: data/<dataset> as written by preprocess_data.py)")
    parser.add_argument("--list_dir", type=Path, default=None, help="folder of the list files (default: --root_path)")
    parser.add_argument("--num_classes", type=int, default=default("num_classes"))
    parser.add_argument("--max_iterations", type=int, default=default("max_iterations"),
                        help="optional cap on training iterations (default: none, --max_epochs decide); a cap "
                             "that ends I-MMSeg training before --region_fusion_start_epoch is refused")
    parser.add_argument("--max_epochs", type=int, default=default("max_epochs"), help="training epochs (default 300)")
    parser.add_argument("--batch_size", type=int, default=default("batch_size"),
                        help="batch size per GPU (per process); the global batch is this times the world size")
    parser.add_argument("--base_lr", type=float, default=default("base_lr"), help="AdamW learning rate")
    parser.add_argument("--img_size", type=int, default=default("img_size"), help="network input size")
    parser.add_argument("--seed", type=int, default=default("seed"))
    parser.add_argument("--n_skip", type=int, default=default("n_skip"), help="skip connections used (0-3)")
    parser.add_argument("--vit_name", default=default("vit_name"),
                        help="configuration: R50-ViT-B_16 (paper), R50-only (released code's encoder), R50-only-release "
                             "(the released code's function), compact (CPU), testing")
    parser.add_argument("--vit_patches_size", type=int, default=default("vit_patches_size"),
                        help="ViT patch size; the R50 hybrid encoders take 16 (1 x 1 patches of the H/16 map)")
    parser.add_argument("--model", default=default("model"), choices=MODEL_NAMES,
                        help="immseg (default) or a TransUNet baseline")
    parser.add_argument("--modality", default=default("modality"), choices=MODALITIES,
                        help="the sequence of --model transunet_single")
    for flag, switch in ABLATIONS.items():
        parser.add_argument(f"--{flag}", action="store_true", default=None if not with_defaults else False,
                            help=f"ablation: config.{switch} = False")
    parser.add_argument("--no_pretrain", action="store_true", default=None if not with_defaults else False,
                        help="train from scratch instead of loading --pretrained_path")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="run folder (default: weights/TU_<dataset><img_size>/<run name>, the released naming)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--amp", default="auto", choices=["auto", "none", "fp16", "bf16"],
                        help="mixed precision (fp16 uses a grad scaler); auto: bf16 on a GPU that computes it natively "
                             "(compute capability 8.0 or newer), none (float32) elsewhere")
    parser.add_argument("--deterministic", type=int, default=None, choices=[0, 1],
                        help="1: deterministic algorithms (bitwise-repeatable runs and resumes); 0: the fastest "
                             "algorithms (cuDNN benchmark). Default: 1 on the CPU, "
                             f"{CUDA_DEFAULTS['deterministic']} on a GPU")


def sequence_list(text):
    """A comma-separated, non-empty list of distinct sequence names -> tuple in MODALITIES' order."""
    names = [name.strip() for name in text.split(",")]
    if any(name not in MODALITIES for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct names from {', '.join(MODALITIES)}")
    return tuple(name for name in MODALITIES if name in names)


# The paper's schedule: 300 epochs, the contrastive loss from epoch 20, the fused head from epoch 100 (from 0).
PAPER_SCHEDULE = {"max_epochs": 300, "start_contrast_epoch": 20, "region_fusion_start_epoch": 100}


def stage_fractions(start_contrast_epoch, region_fusion_start_epoch, max_epochs):
    """[(first epoch, fraction of the run)] of the schedule's stages (modality heads, + contrast, fused)."""
    bounds = [0, min(start_contrast_epoch, region_fusion_start_epoch), region_fusion_start_epoch, max_epochs]
    return [(low, (high - low) / max_epochs) for low, high in zip(bounds, bounds[1:]) if high > low]


def fit_stages(args):
    """Fill --start_contrast_epoch and --region_fusion_start_epoch where the user left them unset: the paper's
    epochs, or, for an I-MMSeg run of no more epochs than the paper's fused stage starts at (which would never
    train the fused head), the paper's fractions of --max_epochs (20/300, 100/300; the fused stage always reached).
    Returns the sentence for the log when the stages were fitted, else None."""
    paper = PAPER_SCHEDULE
    short = args.model == "immseg" and args.max_epochs <= paper["region_fusion_start_epoch"]
    fitted = []
    if args.region_fusion_start_epoch is None:
        args.region_fusion_start_epoch = paper["region_fusion_start_epoch"]
        if short:
            args.region_fusion_start_epoch = min(args.max_epochs - 1, math.floor(
                args.max_epochs * paper["region_fusion_start_epoch"] / paper["max_epochs"] + 0.5))
            fitted.append(f"the fused head from epoch {args.region_fusion_start_epoch + 1}")
    if args.start_contrast_epoch is None:
        args.start_contrast_epoch = paper["start_contrast_epoch"]
        if short:
            args.start_contrast_epoch = min(args.region_fusion_start_epoch, math.floor(
                args.max_epochs * paper["start_contrast_epoch"] / paper["max_epochs"] + 0.5))
            fitted.append(f"the contrastive loss from epoch {args.start_contrast_epoch + 1}")
    if not fitted:
        return None
    return (f"--max_epochs {args.max_epochs} is shorter than the paper's schedule (the fused head from epoch "
            f"{paper['region_fusion_start_epoch'] + 1} of {paper['max_epochs']}): its stages are fitted at the paper's "
            f"fractions, {' and '.join(fitted)} (--start_contrast_epoch {args.start_contrast_epoch}, "
            f"--region_fusion_start_epoch {args.region_fusion_start_epoch}, counted from 0)")


def filled(args):
    """args with the run defaults put in for flags left unset."""
    args = copy.copy(args)
    for name, value in RUN_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for flag in list(ABLATIONS) + ["no_pretrain"]:
        setattr(args, flag, bool(getattr(args, flag, False)))
    if args.root_path is None:
        args.root_path = ROOT / DATASET_ROOTS[args.dataset]
    if args.list_dir is None:
        args.list_dir = args.root_path
    return args


def run_directory(args):
    """The released snapshot naming, extended with the model and ablations."""
    name = "TU" + ("" if args.no_pretrain else "_pretrain") + f"_{args.vit_name}_skip{args.n_skip}"
    if args.max_iterations is not None:
        cap = args.max_iterations
        name += f"_{cap // 1000}k" if cap % 1000 == 0 else f"_{cap}it"
    if args.max_epochs != 30:
        name += f"_epo{args.max_epochs}"
    name += f"_bs{args.batch_size}"
    if args.base_lr != 0.01:
        name += f"_lr{args.base_lr}"
    name += f"_{args.img_size}"
    if args.seed != 1234:
        name += f"_s{args.seed}"
    if args.model != "immseg":
        name += f"_{args.model}" + (f"-{args.modality}" if args.model == "transunet_single" else "")
        if getattr(args, "input_sequences", None) is not None:
            name += "-" + "-".join(args.input_sequences)
    name += "".join(f"_{flag}" for flag in ABLATIONS if getattr(args, flag))
    return ROOT / "weights" / f"TU_{args.dataset}{args.img_size}" / name


def build_config(args, text_dim=None):
    if args.vit_patches_size != 16:
        raise ValueError(f"--vit_patches_size {args.vit_patches_size}: the R50 hybrid encoders embed the H/16 ResNet "
                         "map with 1 x 1 patches, which is --vit_patches_size 16")
    config = get_config(args.vit_name)
    config.n_classes = args.num_classes
    config.n_skip = args.n_skip
    if getattr(args, "contrast_sample_num", None) is not None:
        config.contrast.sample_num = args.contrast_sample_num
    for flag, switch in ABLATIONS.items():
        setattr(config, switch, not getattr(args, flag))
    if text_dim is not None:
        config.text_dim = int(text_dim)
    return config
