"""The training loop, checkpoints and run folders shared by train.py and test.py.

One process per device; under torchrun the processes form a DistributedDataParallel
group (NCCL on GPUs, gloo on CPUs) and rank 0 alone logs, writes TensorBoard and
saves. A checkpoint holds everything needed to continue exactly: weights (unwrapped
from DDP), optimizer, grad scaler, epoch, iteration and position in the epoch, best
metric, every rank's RNG states, the model specification (configuration included),
the arguments, the prior file's provenance, the training data's preprocessing
record and the git commit. Augmentation is seeded by each sample's position in the
run, so a resumed run continues the same stream whatever the loader workers did.
"""
import contextlib
import copy
import datetime
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ml_collections
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from datasets.dataset_myops import MyoPSDataset, RandomGenerator
from datasets.vocabulary import MODALITIES
from engine.checkpoint_writer import BackgroundCheckpointWriter, CheckpointWriteError
from networks.inference import autocast_context, fuse_for_inference, predict_volume, warn_if_bf16_is_emulated
from networks.vit_seg_configs import get_config, with_switch_defaults
from networks.vit_seg_modeling import MODEL_NAMES, build_model, compile_regions
from priors.store import embeddings_sha256
from utils import (BASELINE_WEIGHTS, PATHOLOGY, IMMSegLoss, atomic_path, case_metrics,
                   loss_weights, process_alive)

logger = logging.getLogger("trainer")

ROOT = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "immseg-checkpoint/1"
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


def resolve_device_defaults(args, device):
    """Fill the flags whose default depends on the device: --amp, --deterministic (and --compile, --num_workers,
    --log_every where the script has them). Returns ``args``, changed in place."""
    cuda = torch.device(device).type == "cuda"
    if getattr(args, "amp", None) in (None, "auto"):
        args.amp = CUDA_DEFAULTS["amp"] if cuda and torch.cuda.is_bf16_supported() else "none"
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


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another configuration."""


def add_run_arguments(parser, with_defaults=True):
    """The released scripts' flags that name a run and define its model, plus the model choice and ablations."""
    default = (lambda name: RUN_DEFAULTS[name]) if with_defaults else (lambda name: None)
    parser.add_argument("--dataset", default=default("dataset"), choices=sorted(DATASET_ROOTS),
                        help="dataset name, used for run naming and the default --root_path (default Myops)")
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
                        help="mixed precision (fp16 uses a grad scaler); auto: bf16 on a GPU that has it, "
                             "none (float32) elsewhere")
    parser.add_argument("--deterministic", type=int, default=None, choices=[0, 1],
                        help="1: deterministic algorithms (bitwise-repeatable runs and resumes); 0: the fastest "
                             "algorithms (cuDNN benchmark). Default: 1 on the CPU, "
                             f"{CUDA_DEFAULTS['deterministic']} on a GPU")


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


def model_spec(args, config):
    return {"model": args.model, "modality": args.modality if args.model == "transunet_single" else None,
            "img_size": args.img_size, "num_classes": args.num_classes, "config": config.to_dict()}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def spec_differences(expected, found):
    flat_expected, flat_found = _flatten(expected), _flatten(found)
    return [f"{key}: {flat_found.get(key)!r} in the checkpoint, {flat_expected.get(key)!r} here"
            for key in sorted(set(flat_expected) | set(flat_found)) if flat_expected.get(key) != flat_found.get(key)]


def model_from_spec(spec, state_dict=None, intensity_priors=None, class_embeddings=None):
    config = ml_collections.ConfigDict(spec["config"])
    if spec["model"] == "immseg" and config.use_text_prior and intensity_priors is None and state_dict is not None:
        intensity_priors, class_embeddings = state_dict["intensity_priors"], state_dict["class_embeddings"]
    return build_model(spec["model"], config, spec["img_size"], spec["num_classes"], intensity_priors,
                       class_embeddings, spec["modality"] or "LGE")


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


class RunFolderError(ValueError):
    """A run folder holds an earlier run's checkpoints that this run would mix with its own."""


def run_checkpoints(run_dir):
    """The checkpoints train.py writes in a run folder: last.pth, best.pth, epoch_N.pth."""
    return sorted(path for pattern in ("last.pth", "best.pth", "epoch_*.pth") for path in Path(run_dir).glob(pattern))


def check_run_folder(run_dir, resume, overwrite=False):
    """Refuse a run folder holding checkpoints unless this run continues them (--resume) or clears them first."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file; choose another --output_dir")
    existing = run_checkpoints(run_dir)
    continues = resume is not None and (resume != "auto" or (run_dir / "last.pth").is_file())
    if not existing or continues or overwrite:
        return
    names = ", ".join(path.name for path in existing)
    if resume == "auto":
        raise RunFolderError(f"run folder {run_dir} holds checkpoints ({names}) but no last.pth for --resume auto: "
                             "continue from one of them with --resume PATH, or start afresh with --overwrite "
                             "(deletes the earlier run's files first)")
    raise RunFolderError(f"run folder {run_dir} already holds checkpoints of an earlier run ({names}): continue it "
                         "with --resume auto, or start afresh with --overwrite (deletes the earlier run's files "
                         "first), or choose another --output_dir")


LOCK_NAME = "train.lock"


def _take_lock(lock, owner):
    """Create ``lock`` holding ``owner``, or take over one left by a dead process of this machine."""
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == owner["host"] and isinstance(holder.get("pid"), int) and not process_alive(
                    holder["pid"]):
                logger.warning("%s was left by process %d, which no longer runs: taking it over", lock, holder["pid"])
                lock.unlink(missing_ok=True)
                continue
            raise RunFolderError(
                f"run folder {lock.parent} is in use: {lock} names process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}. Two runs in one folder would "
                f"overwrite each other's checkpoints: wait for that run to end, choose another --output_dir, or "
                f"delete {lock} if no process uses the folder any more") from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump(owner, handle)
        return
    raise RunFolderError(f"{lock}: another process took the run folder's lock at the same time; try again")


@contextlib.contextmanager
def run_folder_lock(run_dir, active=True):
    """Hold ``<run_dir>/train.lock`` while this process trains (or times its step) in the folder.

    A second process that would write the same checkpoints is refused with the first's pid, host and start. A
    lock left by a process of this machine that no longer runs (killed) is taken over; one from another machine
    must be deleted by hand. A folder this call created is removed again if it is still empty at the end.
    ``active=False`` (the other processes of a distributed run) does nothing.
    """
    if not active:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        _take_lock(lock, owner)
        yield
    finally:
        try:
            if json.loads(lock.read_text()) == owner:
                lock.unlink()
        except (OSError, ValueError):
            pass
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def clear_run_folder(run_dir):
    """Delete what train.py and test.py wrote in a run folder; anything else stays. Returns the deleted paths."""
    run_dir = Path(run_dir)
    files = run_checkpoints(run_dir) + [run_dir / name for name in ("config.json", "log.txt")
                                        if (run_dir / name).is_file()]
    folders = [run_dir / "log"] if (run_dir / "log").is_dir() else []
    folders += [folder for folder in sorted(run_dir.glob("test_*"))
                if (folder / "test_info.json").is_file() or (folder / "summary.json").is_file()]
    for path in files:
        path.unlink()
    for folder in folders:
        shutil.rmtree(folder)
    return files + folders


# What the model sees of preprocessing: test data must have been written with the training data's values.
PREPROCESSING_KEYS = ("spacing_mm", "crop_size", "intensity", "percentiles", "crop_centre")


def read_preprocessing(root_path):
    """The preprocessing record of a dataset folder: its dataset.json's "modalities" and "settings".

    None for data without dataset.json (such as the review release's processed data).
    """
    path = Path(root_path) / "dataset.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) \
            or not isinstance(record.get("modalities"), list):
        raise ValueError(f"{path} lacks the 'modalities' list and 'settings' that preprocess_data.py writes")
    return {"modalities": record["modalities"], "settings": record["settings"]}


def preprocessing_differences(trained, tested):
    """The differences, as sentences, between the training data's and the test data's preprocessing records."""
    def comparable(record):
        values = {"sequence order": record["modalities"],
                  **{key: record["settings"].get(key) for key in PREPROCESSING_KEYS}}
        values["intensity"] = values["intensity"] or "percentile"  # records from before --intensity existed
        values["crop_centre"] = values["crop_centre"] or "image"  # records from before --crop_centre existed
        return values

    trained, tested = comparable(trained), comparable(tested)
    return [f"{key}: {trained[key]!r} in the training data, {tested[key]!r} here" for key in trained
            if trained[key] != tested[key]]


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()


def setup_distributed(device_flag):
    """Read torchrun's environment; pick the device; start the process group for several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank, world_size, local_rank, device)


def seed_everything(seed, deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # filling every new tensor with NaN only exposes reads of unwritten memory; results do not depend on it
        torch.utils.deterministic.fill_uninitialized_memory = False


def rng_state():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))


def all_rng_states(ctx):
    if not ctx.distributed:
        return [rng_state()]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state())
    return states


class PositionSeededSampler(DistributedSampler):
    """DistributedSampler yielding (index, augmentation seed) pairs, from position ``start`` of the epoch on.

    The seed is (seed, epoch, rank, position in the epoch): what a sample's augmentation
    draws depends on where it stands in the run, not on which loader worker reads it or
    what that worker read before, so a resumed run continues the uninterrupted stream
    with any number of workers, also from the middle of an epoch.
    """

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        for position in range(self.start, len(indices)):
            yield indices[position], (self.seed, self.epoch, self.rank, position)

    def __len__(self):
        return self.num_samples - self.start


class SeededAugmentation(Dataset):
    """Training slices augmented with a generator seeded by the key that PositionSeededSampler gives."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        sample = self.dataset[index]
        augmented = self.transform({"image": sample["image"].numpy(), "label": sample["label"].numpy()},
                                   rng=np.random.default_rng(seed))
        augmented["case_name"] = sample["case_name"]
        return augmented


def leave_stop_signals_to_the_trainer(worker_id):
    """Loader workers ignore SIGINT and SIGTERM: the training process stops them after saving its position."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped between two steps on SIGINT or SIGTERM, after saving its exact position in last.pth."""

    def __init__(self, signal_number):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class StopRequest:
    """While active, SIGINT and SIGTERM ask training to stop after the current step.

    The trainer shares the request between ranks every step, so a signal on any rank
    stops all of them at the same step. A second signal interrupts at once, without saving.
    """

    def __init__(self):
        self.signal_number = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number, frame):
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number
        logger.warning("%s received: stopping after this step (a second signal stops at once, without saving)",
                       signal.Signals(number).name)


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    iteration: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    epoch_iteration: int = 0  # steps done in the epoch in progress (non-zero only in an interrupted checkpoint)


def iteration_budget(args, iterations_per_epoch, model_name):
    """Iterations of the run: ``max_epochs`` epochs, cut by ``--max_iterations`` if that is smaller.

    A cap that would end I-MMSeg training before its fused head (the inference output)
    starts training is refused; a cap that shortens the run is logged with the epoch it ends in.
    """
    planned = args.max_epochs * iterations_per_epoch
    if args.max_iterations is None or args.max_iterations >= planned:
        return planned
    if args.max_iterations < 1:
        raise ValueError(f"--max_iterations must be positive, got {args.max_iterations}")
    last_epoch = math.ceil(args.max_iterations / iterations_per_epoch)  # counted from 1
    described = (f"--max_iterations {args.max_iterations} ends training in epoch {last_epoch} of "
                 f"{args.max_epochs} ({iterations_per_epoch} iterations per epoch, {planned} for all epochs)")
    if model_name == "immseg" and last_epoch <= args.region_fusion_start_epoch:
        raise ValueError(f"{described}, before the fused head, the only one used at inference, starts training "
                         f"in epoch {args.region_fusion_start_epoch + 1} (--region_fusion_start_epoch "
                         f"{args.region_fusion_start_epoch}, counted from 0): raise or drop --max_iterations, or "
                         "lower --region_fusion_start_epoch")
    logger.info("%s: the run is shortened", described)
    return args.max_iterations


def poly_lr(base_lr, iteration, max_iterations):
    return base_lr * (1.0 - iteration / max_iterations) ** 0.9


def mean_pathology_dice(model, dataset, args, device):
    """Mean over validation volumes of the mean of scar and edema Dice, in the processed grid."""
    scores = []
    for index in range(len(dataset)):
        volume = dataset[index]
        probabilities = predict_volume(model, volume["image"], args.img_size, args.batch_slices, device, args.amp,
                                       channels_last=False)
        prediction = probabilities.argmax(dim=0).numpy()
        metrics = case_metrics(prediction, volume["label"].numpy(), spacing=None)
        dice = np.asarray([metrics[name][0] for name in PATHOLOGY], dtype=np.float64)
        # a volume without scar and edema in reference and prediction has no defined pathology Dice
        scores.append(dice[np.isfinite(dice)].mean() if np.isfinite(dice).any() else math.nan)
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else 0.0


class Trainer:
    """Trains one model on one preprocessed dataset; see train.py for the flags."""

    def __init__(self, args, ctx, model, spec, run_dir, priors_provenance=None):
        self.args, self.ctx, self.spec, self.run_dir = args, ctx, spec, run_dir
        self.priors_provenance = priors_provenance
        self.model = model.to(ctx.device)
        if ctx.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocessing = read_preprocessing(args.root_path)
        self.train_set = MyoPSDataset(args.root_path, args.list_dir, "train")
        val_list = Path(args.list_dir) / "val.txt"
        self.val_set = (MyoPSDataset(args.root_path, args.list_dir, "val")
                        if val_list.is_file() and val_list.read_text().strip() else None)
        if len(self.train_set) < args.batch_size * ctx.world_size:
            raise ValueError(f"{len(self.train_set)} training slices in {args.list_dir / 'train.txt'} are fewer than "
                             f"one global batch ({args.batch_size} x {ctx.world_size} processes)")
        self.sampler = PositionSeededSampler(self.train_set, ctx.world_size, ctx.rank, args.seed)
        augmented = SeededAugmentation(self.train_set, RandomGenerator((args.img_size, args.img_size),
                                                                       args.augmentation))
        # The loader's own generator keeps its worker seeds off the global stream that the model draws from.
        self.loader = DataLoader(augmented, args.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda",
                                 persistent_workers=args.num_workers > 0,
                                 worker_init_fn=leave_stop_signals_to_the_trainer,
                                 generator=torch.Generator().manual_seed(args.seed))
        self.max_iterations = iteration_budget(args, len(self.loader), spec["model"])
        self.optimizer = make_optimizer(self.model.parameters(), args.base_lr, args.weight_decay, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
        warn_if_bf16_is_emulated(ctx.device, args.amp, logger)
        self.criterion = IMMSegLoss(args.num_classes, model.config.contrast,
                                    args.dice_class_weights).to(ctx.device)
        self.state = TrainState()
        self.stop = StopRequest()
        self.writer = None
        self.git_commit = git_commit()
        self.checkpoint_writer = BackgroundCheckpointWriter()
        self.pending_losses = []  # (iteration, lr, loss, terms) of the steps whose losses are still on the device
        self.last_losses = None  # (loss, {term: value}) of the last step read back
        self.compile_mode = getattr(args, "compile", "off") or "off"
        self.compiled_stages = set()  # loss weights whose compiled step has run once
        if self.compile_mode != "off" and not compile_in_place(self.model, self.criterion, self.compile_mode):
            self.compile_mode = "off"

    # checkpoints -------------------------------------------------------------------------------------------
    def checkpoint(self, rng_states, interrupted=False):
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "train_state": asdict(self.state), "interrupted": interrupted,
                "rng": rng_states, "spec": self.spec, "args": _plain(vars(self.args)),
                "priors": self.priors_provenance, "preprocessing": self.preprocessing, "git_commit": self.git_commit,
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def save(self, names, interrupted=False, wait=False):
        """Write the training state under ``names`` in the background (``wait``: before returning). The losses
        of the steps since the last read are checked first, so a non-finite loss never reaches a checkpoint.
        A save of last.pth alone is skipped while the previous save is still being written (the next epoch's
        comes soon); every other save waits for it."""
        self.read_losses()
        rng_states = all_rng_states(self.ctx)
        if not self.ctx.is_main:
            return
        paths = [self.run_dir / name for name in names]
        optional = names == ["last.pth"] and not interrupted and not wait
        if self.checkpoint_writer.submit(self.checkpoint(rng_states, interrupted), paths, skip_if_busy=optional):
            logger.info("saving %s (epoch %d, iteration %d)", ", ".join(names), self.state.epoch,
                        self.state.iteration)
        else:
            logger.info("last.pth of epoch %d skipped: the previous checkpoint is still being written",
                        self.state.epoch)
        if wait:
            self.checkpoint_writer.wait()

    def resume(self, path):
        # On the CPU: the RNG states must stay CPU tensors; weights and optimizer state are copied to the
        # device of the parameters they are loaded into.
        try:
            checkpoint = load_checkpoint(path, map_location="cpu")
        except CheckpointError as error:
            older = newest_epoch_checkpoint(Path(path).parent, exclude=Path(path))
            if older is None:
                raise
            raise CheckpointError(f"{error}\nThe newest epoch checkpoint of the run is {older}: continue from it "
                                  f"with --resume {older}") from None
        if "optimizer" not in checkpoint:
            raise CheckpointError(f"{path} holds weights without a training state (a converted checkpoint): "
                                  "it can be tested, not resumed")
        # switches added since the checkpoint was written take the values it was trained with
        found = dict(checkpoint["spec"], config=with_switch_defaults(checkpoint["spec"]["config"]).to_dict())
        differences = spec_differences(self.spec, found)
        if differences:
            raise CheckpointError(f"{path} was trained with another configuration:\n  " + "\n  ".join(differences))
        self.check_priors(checkpoint, path)
        self.check_epoch_position(checkpoint, path)
        load_model_state(self.model, checkpoint["model"], path)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["train_state"])
        states = checkpoint["rng"]
        if len(states) == self.ctx.world_size:
            set_rng_state(states[self.ctx.rank])
        else:
            logger.warning("%s was saved by %d processes, this run has %d: random streams restart from the seed",
                           path, len(states), self.ctx.world_size)
        logger.info("resumed from %s at epoch %d, iteration %d%s", path, self.state.epoch, self.state.iteration,
                    f" (interrupted after step {self.state.epoch_iteration} of epoch {self.state.epoch + 1}: "
                    "it continues from there)" if checkpoint["interrupted"] else "")

    def check_epoch_position(self, checkpoint, path):
        """A checkpoint saved mid-epoch counts its position in steps of its own global batch: continuing it with
        another batch size or number of processes would skip or repeat samples."""
        steps = checkpoint["train_state"].get("epoch_iteration", 0)
        saved = (checkpoint["args"].get("batch_size"), len(checkpoint["rng"]))
        here = (self.args.batch_size, self.ctx.world_size)
        if steps and saved != here:
            raise CheckpointError(
                f"{path} was interrupted after step {steps} of an epoch at --batch_size {saved[0]} on {saved[1]} "
                f"process(es); this run has --batch_size {here[0]} on {here[1]}: resume it with the same batch size "
                "and processes, or from the last end-of-epoch checkpoint (epoch_N.pth)")

    def check_priors(self, checkpoint, path):
        """The prior file in use must hold the checkpoint's embeddings, encoded from the same prompts.

        Resuming restores the checkpoint's prior buffers, so another file would be recorded but not used.
        """
        if self.priors_provenance is None:
            return
        recorded, state = checkpoint.get("priors") or {}, checkpoint["model"]
        found = {"embeddings_sha256": recorded.get("embeddings_sha256"), "prompt_sha256": recorded.get("prompt_sha256")}
        if found["embeddings_sha256"] is None and "intensity_priors" in state:  # checkpoints that predate the hash
            found["embeddings_sha256"] = embeddings_sha256(state["intensity_priors"], state["class_embeddings"])
        differences = [f"{key}: {value} in the checkpoint, {self.priors_provenance.get(key)} in the prior file"
                       for key, value in found.items() if value != self.priors_provenance.get(key)]
        if differences:
            raise CheckpointError(
                f"{path} was trained with other text priors ({recorded.get('origin', 'origin not recorded')}) than "
                f"--prior_embeddings {self.args.prior_embeddings}:\n  " + "\n  ".join(differences)
                + "\nResume with the run's prior file (config.json: args.prior_embeddings), or start a new run")

    # training ----------------------------------------------------------------------------------------------
    def weights_for(self, epoch):
        if self.spec["model"] != "immseg":
            return BASELINE_WEIGHTS
        return loss_weights(epoch, self.args.start_contrast_epoch, self.args.region_fusion_start_epoch,
                            self.args.contrast_w, use_contrast=not self.args.no_contrast)

    def forward_backward(self, network, images, labels, weights):
        with autocast_context(images.device, self.args.amp):
            output = network(images, fused=weights.fused > 0, contrast=weights.contrast > 0)
            loss, terms = self.criterion(output, labels, weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return output, loss.detach(), terms

    def train_step(self, network, batch, weights):
        """One optimisation step. The loss stays on the device (read_losses reads it every --log_every steps), so
        the host never waits for the device within a step (except fp16's grad scaler)."""
        device = self.ctx.device
        images = batch["image"].to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        lr = poly_lr(self.args.base_lr, self.state.iteration, self.max_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first_compiled_step = self.compile_mode != "off" and weights not in self.compiled_stages
        random_state = rng_state() if first_compiled_step else None
        try:
            output, loss, terms = self.forward_backward(network, images, labels, weights)
        except Exception as error:  # noqa: BLE001 - any failure of compilation falls back to the eager step
            if not first_compiled_step:
                raise
            logger.warning("torch.compile failed (%s: %s); training continues without compilation, as with "
                           "--compile off", type(error).__name__, (str(error).strip().splitlines() or [""])[0][:500])
            self.compile_mode = "off"
            torch.compiler.set_stance("force_eager")
            set_rng_state(random_state)
            output, loss, terms = self.forward_backward(network, images, labels, weights)
        if first_compiled_step:
            self.compiled_stages.add(weights)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.iteration += 1
        self.state.epoch_iteration += 1
        self.pending_losses.append((self.state.iteration, lr, loss, terms))
        if len(self.pending_losses) >= getattr(self.args, "log_every", 1):
            self.read_losses()
        return output, loss, terms, lr

    def stop_if_requested(self):
        """Raise TrainingInterrupted on every rank as soon as any rank has received SIGINT or SIGTERM."""
        number = self.stop.signal_number
        if self.ctx.distributed:
            shared = torch.tensor(number, device=self.ctx.device)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            number = int(shared.item())
        if number:
            raise TrainingInterrupted(number)

    def read_losses(self):
        """Read the losses of the steps since the last read from the device in one transfer: stop at the first
        non-finite one (on any rank), else log them to TensorBoard and keep the newest for the progress bar."""
        pending, self.pending_losses = self.pending_losses, []
        if not pending:
            return
        names = list(pending[-1][3])
        values = torch.stack([torch.stack([loss.float()] + [terms[name].float() for name in names])
                              for _, _, loss, terms in pending])
        finite = torch.isfinite(values[:, 0]).float()
        if self.ctx.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        values, finite = values.cpu().tolist(), finite.cpu().tolist()
        for (iteration, lr, _, _), row, ok in zip(pending, values, finite):
            if not ok:
                described = ", ".join(f"{name} {value:.4g}" for name, value in zip(names, row[1:]))
                raise FloatingPointError(f"non-finite loss at epoch {self.state.epoch + 1}, iteration {iteration} "
                                         f"({described or 'on another process'}); the last good checkpoint is kept "
                                         f"in {self.run_dir}")
            if self.writer is not None:
                self.writer.add_scalar("info/lr", lr, iteration)
                self.writer.add_scalar("loss/total", row[0], iteration)
                for name, value in zip(names, row[1:]):
                    self.writer.add_scalar(f"loss/{name}", value, iteration)
        self.last_losses = (values[-1][0], dict(zip(names, values[-1][1:])))

    def log_images(self, output, batch):
        step = self.state.iteration
        if self.writer is not None and step % self.args.image_every == 0:
            logits = output.fused_logits if output.fused_logits is not None else output.modality_logits[0]
            prediction = logits[0].detach().float().argmax(dim=0).cpu() / (self.args.num_classes - 1)
            label = batch["label"][0].float() / (self.args.num_classes - 1)
            grid = torch.cat([*batch["image"][0].float(), prediction, label], dim=1)
            self.writer.add_image("train/bSSFP_LGE_T2w_prediction_label", grid[None], step)

    def fused_head_trained(self):
        """Validation scores the fused head, which I-MMSeg trains only from region_fusion_start_epoch on."""
        return self.spec["model"] != "immseg" or self.state.epoch > self.args.region_fusion_start_epoch

    def validate(self):
        with eager_if_compiled(self.compile_mode):  # evaluation graphs are not worth their compilation
            score = mean_pathology_dice(self.model, self.val_set, self.args, self.ctx.device)
        self.model.train()
        if self.writer is not None:
            self.writer.add_scalar("val/mean_pathology_dice", score, self.state.iteration)
        return score

    def fit(self):
        ctx, args = self.ctx, self.args
        network = (DistributedDataParallel(self.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda"
                                           else None, find_unused_parameters=True)
                   if ctx.distributed else self.model)
        if ctx.is_main:
            self.writer = tensorboard_writer(self.run_dir / "log")
        logger.info("%d training slices, %d iterations per epoch, %d iterations in all, %s validation volumes",
                    len(self.train_set), len(self.loader), self.max_iterations,
                    len(self.val_set) if self.val_set else "no")
        network.train()
        start_time, start_iteration = time.perf_counter(), self.state.iteration
        try:
            with self.stop:
                try:
                    while self.state.epoch < args.max_epochs and self.state.iteration < self.max_iterations:
                        self.train_epoch(network)
                        self.end_epoch()
                except TrainingInterrupted as interruption:
                    logger.warning("%s: stopped in epoch %d after %d of its %d steps (iteration %d); saving "
                                   "last.pth, from which --resume auto continues with the next step", interruption,
                                   self.state.epoch + 1, self.state.epoch_iteration,
                                   self.sampler.num_samples // args.batch_size, self.state.iteration)
                    self.save(["last.pth"], interrupted=True, wait=True)
                    self.ctx.barrier()  # under torchrun, a rank that exits early gets the others killed
                    raise
                self.checkpoint_writer.wait()  # a stop signal meanwhile lets the last write finish
        except KeyboardInterrupt as interruption:
            if not isinstance(interruption, TrainingInterrupted):
                logger.warning("interrupted within a step: nothing saved, last.pth holds the state of its last "
                               "completed save")
            raise
        finally:
            self.finish_writing()
            if self.writer is not None:
                self.writer.close()
        logger.info("training finished: %d epochs, %d iterations; best mean pathology Dice %s", self.state.epoch,
                    self.state.iteration, f"{self.state.best_metric:.4f} at epoch {self.state.best_epoch}"
                    if self.state.best_epoch >= 0 else "n/a (no validation set)")
        done, seconds = self.state.iteration - start_iteration, time.perf_counter() - start_time
        peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(ctx.device) / 2 ** 20:.0f} MiB"
                if ctx.device.type == "cuda" else "")
        logger.info("%d iterations in %.1f s: %.3f s per iteration (with data loading, validation and saving)%s",
                    done, seconds, seconds / max(done, 1), peak)
        return self.state

    def train_epoch(self, network):
        epoch = self.state.epoch
        self.sampler.set_epoch(epoch)
        self.sampler.start = self.state.epoch_iteration * self.args.batch_size
        weights = self.weights_for(epoch)
        progress = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.args.max_epochs}", leave=False,
                        disable=not self.ctx.is_main or not self.args.progress, dynamic_ncols=True)
        for batch in progress:
            self.stop_if_requested()
            output, _, _, lr = self.train_step(network, batch, weights)
            if self.ctx.is_main:
                if self.last_losses is not None:
                    progress.set_postfix(loss=f"{self.last_losses[0]:.4f}", lr=f"{lr:.2e}", refresh=False)
                self.log_images(output, batch)
            if self.state.iteration >= self.max_iterations:
                break
        progress.close()
        self.read_losses()
        loss, terms = self.last_losses or (math.nan, {})
        logger.info("epoch %d: iteration %d, loss %.4f (%s), weights %s", epoch + 1, self.state.iteration, loss,
                    ", ".join(f"{k} {v:.4f}" for k, v in terms.items()), tuple(weights))

    def finish_writing(self):
        """Wait for a checkpoint write in flight; its failure is logged (an error being raised takes precedence)."""
        try:
            self.checkpoint_writer.wait()
        except CheckpointWriteError as error:
            logger.error("%s", error)

    def end_epoch(self):
        self.state.epoch += 1
        self.state.epoch_iteration = 0
        args, names = self.args, ["last.pth"]
        finished = self.state.epoch >= args.max_epochs or self.state.iteration >= self.max_iterations
        if self.val_set is not None and self.fused_head_trained() and (self.state.epoch % args.val_every == 0
                                                                       or finished):
            score = self.validate() if self.ctx.is_main else None
            if self.ctx.distributed:
                shared = [score]
                dist.broadcast_object_list(shared, src=0)
                score = shared[0]
            logger.info("epoch %d: validation mean pathology Dice %.4f", self.state.epoch, score)
            if score > self.state.best_metric:
                self.state.best_metric, self.state.best_epoch = score, self.state.epoch
                names.append("best.pth")
        if self.state.epoch % args.save_every == 0 or finished:
            names.append(f"epoch_{self.state.epoch - 1}.pth")
        self.save(names)


# torch.compile's backend; the tests use "aot_eager" (inductor's C++ code generation takes minutes on a small CPU)
COMPILE_BACKEND = "inductor"


def compile_in_place(model, criterion, mode):
    """Compile the model's regions (compile_regions) and the loss in place for --compile on; parameters, state dict
    and module names stay as they are. Random draws (dropout, contrast sampling) come from the eager generator, so
    a compiled run draws what an eager one draws. False (with a warning) where this PyTorch cannot."""
    import torch._inductor.config as inductor_config

    if not hasattr(torch.compiler, "set_stance"):
        logger.warning("--compile %s needs PyTorch 2.6 or newer (this is %s): training runs without compilation",
                       mode, torch.__version__)
        return False
    inductor_config.fallback_random = True
    regions = compile_regions(model)
    for module in regions + [criterion]:
        module.compile(backend=COMPILE_BACKEND)
    logger.info("--compile %s: %d regions of the model and the loss, compiled at their first calls", mode,
                len(regions))
    return True


def eager_if_compiled(mode):
    """A context in which compiled modules run eagerly (no compilation of evaluation graphs)."""
    if mode == "off":
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def tensorboard_writer(folder):
    """A TensorBoard writer, or None (with a warning) where tensorboardX is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logger.warning("tensorboardX is not installed: no TensorBoard events are written (pip install tensorboardX)")
        return None
    return SummaryWriter(str(folder))


def make_optimizer(parameters, lr, weight_decay, device):
    """AdamW, with the fused (single-kernel) update where this PyTorch build has one for the device."""
    fused = device.type == "cuda" or (device.type == "cpu" and hasattr(torch, "_fused_adamw_"))
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def _plain(mapping):
    return {k: str(v) if isinstance(v, Path) else v for k, v in mapping.items()}


def write_run_config(run_dir, args, spec, priors_provenance, preprocessing):
    """config.json beside the checkpoints: the model specification, the arguments, the priors and the
    training data's preprocessing record (read_preprocessing)."""
    with atomic_path(run_dir / "config.json") as temporary:
        temporary.write_text(json.dumps({"spec": spec, "args": _plain(vars(args)), "priors": priors_provenance,
                                         "preprocessing": preprocessing, "git_commit": git_commit()},
                                        indent=2, default=str) + "\n")


def configure_logging(run_dir=None, is_main=True):
    """Console (and, on rank 0, run-folder) logging; replaces only the handlers it added before."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "immseg_handler", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    formatter = logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in handlers:
        handler.immseg_handler = True
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
