"""Cross-validated MyoPS 2020 benchmark: I-MMSeg, its ablations and the TransUNet baselines at equal compute.

    python benchmarks/myops2020.py split --src ../shared/data/myops2020 --split_file data/myops2020_split.json
    python benchmarks/myops2020.py prepare --src ../shared/data/myops2020 --split_file data/myops2020_split.json \
        --data data/myops2020_1mm_176
    python benchmarks/myops2020.py run --data data/myops2020_1mm_176 --out runs/myops2020_benchmark \
        --variant immseg --fold 0 --budget_minutes 42 --biomedclip_priors priors/embeddings/biomedclip_released.pt
    python benchmarks/myops2020.py report --out runs/myops2020_benchmark

split: seeded k-fold cross-validation over the case ids, written once and reused.
prepare: preprocess_data.py once per fold (the fold's held-out cases are its test set) into a folder named
by the user; one folder per input setting (spacing, crop size, further preprocess_data.py flags after --).
run: one variant on one fold. In --mode time, the variant's own training step (loader included, at the
recipe's batch size, each stage of its schedule) is timed first, and the wall-clock budget becomes
iterations; --mode iterations takes a fixed --iterations. The schedule is fitted to those iterations
(epochs, the poly learning rate's end, the contrastive and fused stages at the paper's 20/300 and
100/300 of the run, or the fused stage at E/300 with --fused_start_epoch E), train.py trains, test.py
scores the fold's test cases in the original image space, and the per-case results are appended to
<out>/results.jsonl. A (variant, fold) already in the results
for the same input and budget is skipped; an interrupted one resumes from its last checkpoint. With --members N,
the budget goes to N trainings of the variant that differ in their seed (and, with a list of --augmentation presets,
in their augmentation; with --member_variants, in their variant), scored as one ensemble (<variant>+ensN).
report: one Markdown table over all cases of all folds, with paired differences against a reference variant.
cases: two variants' per-case Dice in one structure, ordered by its volume in the labels (where does a gap sit?).
fit: one trained run scored on its fold's training cases and on its test cases (-> <out>/fit.jsonl and the table
<out>/fit.md): how much of what a run learnt carries over to cases it did not see.
agreement: each member of a recorded ensemble scored alone and the mean Dice between every two members' predictions
(-> <out>/agreement.jsonl and the table <out>/agreement.md): how much an ensemble gains over its members, and why.
"""
import argparse
import contextlib
import csv
import datetime
import gc
import itertools
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.stats
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import locate_heart  # noqa: E402
import preprocess_data  # noqa: E402
import test as test_script  # noqa: E402
import train as train_script  # noqa: E402
from datasets.dataset_myops import AUGMENTATIONS  # noqa: E402
from datasets.layouts import load_case  # noqa: E402
from datasets.vocabulary import MODALITIES  # noqa: E402
from networks.inference import cpu_features  # noqa: E402
from priors import EncoderUnavailableError  # noqa: E402
from engine.distributed import all_rng_states, seed_everything, setup_distributed  # noqa: E402
from engine.options import PAPER_SCHEDULE, RUN_DEFAULTS, resolve_device_defaults  # noqa: E402
from engine.runs import configure_logging, git_commit, run_folder_lock  # noqa: E402
from trainer import Trainer  # noqa: E402
from utils import STRUCTURES, atomic_path, summarise  # noqa: E402

logger = logging.getLogger("benchmark")

SPLIT_FORMAT = "immseg-cv-split/1"
INPUT_FORMAT = "immseg-cv-input/1"
DATASETS = ("MyoPS2020", "Phantom")  # preprocess_data.py's names whose train.py --dataset is the same
# README's run C: compact, 1.0 mm, 176 px (the input, from `prepare`), strong augmentation, batch 8, no npz.
RECIPE_INPUT = {"spacing": 1.0, "crop_size": 176}
RECIPE_FLAGS = {"vit_name": "compact", "batch_size": 8, "augmentation": "strong"}
RECIPE_SWITCHES = ("--no_pretrain",)
PROMPTS = ROOT / "priors" / "prompts"
STRUCTURE_NAMES = {"myocardium": "normal myocardium", "scar": "scar", "edema": "edema",
                   "scar_edema": "scar+edema", "whole_myocardium": "whole myocardium"}


class BenchmarkError(ValueError):
    """Bad benchmark input or state; the message names the file and what was expected."""


@dataclass(frozen=True)
class Variant:
    description: str
    flags: tuple = ()
    priors: str = None  # "biomedclip" (--biomedclip_priors), "offline" (the offline encoder), None (no text)
    prompts: str = "intensity.json"
    config: str = None  # the configuration it trains instead of the recipe's (--vit_name), None: the recipe's


VARIANTS = {
    "immseg": Variant("I-MMSeg, full", (), "biomedclip"),
    "immseg_half": Variant("I-MMSeg, half the ResNet and decoder widths", (), "biomedclip", config="compact-half"),
    "immseg_scar2": Variant("I-MMSeg, scar's soft Dice weighted 2 (0.5, 1, 2, 1)",
                            ("--dice_class_weights", "0.5,1,2,1"), "biomedclip"),
    "no_cmfe": Variant("I-MMSeg without CMFE", ("--no_cmfe",), "biomedclip"),
    "no_cfm": Variant("I-MMSeg without CFM", ("--no_cfm",), "biomedclip"),
    "no_contrast": Variant("I-MMSeg without the contrastive loss", ("--no_contrast",), "biomedclip"),
    "names_only": Variant("I-MMSeg, intensity-free prompts (names only)", (), "offline", "names_only.json"),
    "offline_priors": Variant("I-MMSeg, priors of the offline encoder", (), "offline"),
    "transunet_early": Variant("TransUNet, early fusion", ("--model", "transunet_early")),
    "transunet_single_lge": Variant("TransUNet, LGE only", ("--model", "transunet_single", "--modality", "LGE")),
    "transunet_single_t2w": Variant("TransUNet, T2w only", ("--model", "transunet_single", "--modality", "T2w")),
}


# ---------------------------------------------------------------------------------------------- pure functions
def make_folds(case_ids, folds=3, seed=1234):
    """Test cases of each fold: a seeded permutation of the sorted ids dealt out in turn, each fold sorted."""
    case_ids = sorted(case_ids)
    if len(case_ids) < folds:
        raise BenchmarkError(f"{len(case_ids)} cases cannot be split into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    return [sorted(case_ids[i] for i in order[k::folds]) for k in range(folds)]


def stage_fractions(start_contrast_epoch, region_fusion_start_epoch, max_epochs):
    """[(first epoch, fraction of the run)] of the schedule's stages (modality heads, + contrast, fused)."""
    bounds = [0, min(start_contrast_epoch, region_fusion_start_epoch), region_fusion_start_epoch, max_epochs]
    return [(low, (high - low) / max_epochs) for low, high in zip(bounds, bounds[1:]) if high > low]


def budget_to_iterations(budget_minutes, seconds_per_step):
    """Training iterations that fit in the wall-clock budget (at least one)."""
    if budget_minutes <= 0 or seconds_per_step <= 0:
        raise BenchmarkError(f"budget {budget_minutes} min and {seconds_per_step} s per step must be positive")
    return max(1, int(budget_minutes * 60.0 // seconds_per_step))


def _round_half_up(value):
    return int(math.floor(value + 0.5))


def fit_schedule(iterations, iterations_per_epoch, paper_epochs=300, paper_contrast=20, paper_fusion=100):
    """train.py's schedule flags for a run of exactly ``iterations``: its epochs, and the contrastive and fused
    stages at the paper's fractions of the run (20/300, 100/300), the fused stage always reached."""
    if iterations < 1 or iterations_per_epoch < 1:
        raise BenchmarkError(f"{iterations} iterations at {iterations_per_epoch} per epoch: both must be positive")
    max_epochs = math.ceil(iterations / iterations_per_epoch)
    fusion = min(_round_half_up(max_epochs * paper_fusion / paper_epochs), max_epochs - 1)
    contrast = min(_round_half_up(max_epochs * paper_contrast / paper_epochs), fusion)
    return {"max_epochs": max_epochs, "max_iterations": iterations, "start_contrast_epoch": contrast,
            "region_fusion_start_epoch": fusion}


def setting_label(mode, budget_minutes=None, iterations=None):
    """The budget as recorded and shown: 'time 42 min' or 'iterations 930'."""
    if mode == "time":
        return f"time {budget_minutes:g} min"
    return f"iterations {iterations}"


# ---------------------------------------------------------------------------------------------- files
def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BenchmarkError(f"{what} {path} is not readable JSON: {error}") from None


def _write_json(path, content):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2) + "\n")


@contextlib.contextmanager
def _locked(path, timeout_s=120):
    """Exclusive access to ``path`` among invocations (a lock folder beside it: mkdir is atomic everywhere)."""
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lock.mkdir()
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{lock} has been held for {timeout_s} s: another invocation is writing "
                                     f"{path}, or one died while writing (then remove {lock})") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        lock.rmdir()


def cpu_model():
    """The processor's model name (Linux: /proc/cpuinfo), else what the platform module reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(device):
    """What a wall-clock budget's iterations depend on besides the code, kept with every record: the same budget
    buys a different number of iterations on another machine."""
    description = {"cpu": cpu_model(), **cpu_features(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device in ("auto", "cuda") and torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def read_results(path):
    """All records of a results file (JSON lines); absent file: none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise BenchmarkError(f"{path}, line {number}: not a JSON record ({error})") from None
    return records


def run_key(record):
    return record["input"], record["variant"], record["setting"], record["fold"]


def append_results(path, records):
    """Add records to the results file; the file is replaced atomically, under a lock."""
    path = Path(path)
    with _locked(path):
        existing = path.read_text() if path.is_file() else ""
        if existing and not existing.endswith("\n"):
            existing += "\n"
        lines = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)
        with atomic_path(path) as temporary:
            temporary.write_text(existing + lines)


# ---------------------------------------------------------------------------------------------- split, prepare
def find_cases(dataset, src):
    finder = preprocess_data.DATASETS[dataset][0]
    return [case.case_id for case in finder(src)]


def write_split(dataset, src, split_file, folds, seed):
    """The split file; an existing one is reused when it holds the same folds, refused otherwise."""
    split = {"format": SPLIT_FORMAT, "dataset": dataset, "source": str(Path(src).resolve()), "seed": seed,
             "folds": make_folds(find_cases(dataset, src), folds, seed)}
    split_file = Path(split_file)
    if split_file.exists():
        existing = _read_json(split_file, "split file")
        if existing.get("folds") != split["folds"]:
            raise BenchmarkError(f"{split_file} holds another split ({len(existing.get('folds') or [])} folds, "
                                 f"seed {existing.get('seed')}); results made with it would no longer match: "
                                 "choose another --split_file")
        logger.info("%s already holds this split: reused", split_file)
        return existing
    _write_json(split_file, split)
    logger.info("%d cases in %d folds (seed %d) -> %s", sum(map(len, split["folds"])), folds, seed, split_file)
    return split


def read_split(split_file):
    split = _read_json(split_file, "split file")
    if split.get("format") != SPLIT_FORMAT or not split.get("folds"):
        raise BenchmarkError(f"{split_file} is not a split file of this benchmark (format {SPLIT_FORMAT})")
    return split


def locate_test_hearts(locator, fold, src, test_cases, centres_file):
    """The fold's test cases located by the fold's coarse run (<locator>/fold<k>), written to ``centres_file``."""
    run_dir = Path(locator) / f"fold{fold}"
    if not run_dir.is_dir():
        raise BenchmarkError(f"--locator {locator} has no run of fold {fold} ({run_dir}): run the coarse variant on "
                             "every fold first")
    config = _read_json(run_dir / "config.json", "locator run configuration")
    training_data = Path(config["args"]["root_path"]) / "dataset.json"
    seen = sorted(set(_read_json(training_data, "locator training data")["split"]["train"]) & set(test_cases))
    if seen:
        raise BenchmarkError(f"the locator {run_dir} was trained on fold {fold}'s test cases {seen} "
                             f"({training_data}): it must be the coarse run of the same fold")
    code = locate_heart.main(["--input_dir", str(Path(src).resolve()), "--run", str(run_dir), "--checkpoint", "last",
                              "--output", str(centres_file), "--cases", *test_cases])
    if code != 0:
        raise BenchmarkError(f"locate_heart.py failed for fold {fold} (exit {code}); see the log above")


def prepare(src, split_file, data, spacing, crop_size, extra_flags=(), locator=None):
    """preprocess_data.py once per fold into <data>/fold<k>, the fold's cases as its test set. With ``locator``
    (a folder of one coarse run per fold), crops are centred on the heart: training cases on their label, each
    fold's test cases on the centre its coarse run finds."""
    split = read_split(split_file)
    cases = find_cases(split["dataset"], src)
    in_split = sorted(c for fold in split["folds"] for c in fold)
    if sorted(cases) != in_split:
        raise BenchmarkError(f"the cases under {src} ({len(cases)}) are not those of {split_file} "
                             f"({len(in_split)}): missing {sorted(set(in_split) - set(cases))}, "
                             f"extra {sorted(set(cases) - set(in_split))}")
    data = Path(data)
    setting = {"format": INPUT_FORMAT, "dataset": split["dataset"], "source": str(Path(src).resolve()),
               "folds": split["folds"], "preprocess_flags": ["--spacing", f"{spacing:g}", "--crop_size",
                                                             str(crop_size), *extra_flags]}
    if locator is not None:
        setting["locator"] = str(Path(locator).resolve())
        setting["preprocess_flags"] += ["--crop_centre", "heart"]
    marker = data / "benchmark_input.json"
    if marker.exists() and _read_json(marker, "input description") != setting:
        raise BenchmarkError(f"{data} was prepared from another split or with other settings ({marker}); "
                             "name another --data folder for this input setting")
    if not marker.exists():
        if data.exists() and any(data.iterdir()):
            raise BenchmarkError(f"{data} exists and is not a folder made by this benchmark's prepare step")
        _write_json(marker, setting)
    for fold, test_cases in enumerate(split["folds"]):
        fold_dir = data / f"fold{fold}"
        if (fold_dir / "dataset.json").is_file():
            logger.info("%s already prepared", fold_dir)
            continue
        fold_split = data / "splits" / f"fold{fold}.json"
        _write_json(fold_split, {"test": test_cases, "val": []})
        fold_flags = list(setting["preprocess_flags"])
        if locator is not None:
            centres_file = data / "centres" / f"fold{fold}.json"
            centres_file.parent.mkdir(parents=True, exist_ok=True)
            locate_test_hearts(locator, fold, src, test_cases, centres_file)
            fold_flags += ["--heart_centres", str(centres_file)]
        code = preprocess_data.main(["--dataset", split["dataset"], "--src_path", str(Path(src).resolve()),
                                     "--dst_path", str(fold_dir), "--split_file", str(fold_split), *fold_flags])
        if code != 0:
            raise BenchmarkError(f"preprocess_data.py failed for fold {fold} (exit {code})")
    return setting


def read_input(data, fold):
    marker = Path(data) / "benchmark_input.json"
    setting = _read_json(marker, "input description")
    if setting.get("format") != INPUT_FORMAT:
        raise BenchmarkError(f"{marker} is not an input description of this benchmark; run prepare first")
    if not 0 <= fold < len(setting["folds"]):
        raise BenchmarkError(f"--fold {fold}: {data} has folds 0 to {len(setting['folds']) - 1}")
    fold_dir = Path(data) / f"fold{fold}"
    dataset = _read_json(fold_dir / "dataset.json", "preprocessed fold")
    if sorted(dataset["split"]["test"]) != sorted(setting["folds"][fold]):
        raise BenchmarkError(f"{fold_dir}'s test cases are not fold {fold} of {marker}; prepare it again")
    return setting, fold_dir, dataset


# ---------------------------------------------------------------------------------------------- run
def recipe_flags(variant_name, fold_dir, crop_size, options, out):
    """train.py flags of a variant before the schedule: the recipe, the variant's own, its priors."""
    variant = VARIANTS[variant_name]
    flags = ["--dataset", options.dataset, "--root_path", str(fold_dir.resolve()), "--img_size", str(crop_size),
             "--vit_name", variant.config or options.vit_name, "--batch_size", str(options.batch_size),
             "--device", options.device,
             "--augmentation", options.augmentation, *RECIPE_SWITCHES, *variant.flags]
    on_gpu = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    if options.amp != "none" or on_gpu:  # train.py's --amp auto is bf16 on a GPU
        flags += ["--amp", options.amp]
    if options.num_workers is not None:
        flags += ["--num_workers", str(options.num_workers)]
    if custom_lr(options) is not None:
        flags += ["--base_lr", f"{options.base_lr:g}"]
    prompts = PROMPTS / variant.prompts
    if variant.priors == "biomedclip":
        if options.biomedclip_priors is None:
            raise BenchmarkError(f"variant {variant_name} needs --biomedclip_priors (a prior file made with "
                                 "python -m priors.encode)")
        flags += ["--prior_embeddings", str(options.biomedclip_priors.resolve()), "--prompts", str(prompts)]
    elif variant.priors == "offline":
        if variant_name == "names_only" and options.names_only_priors is not None:
            flags += ["--prior_embeddings", str(options.names_only_priors.resolve()), "--prompts", str(prompts)]
        else:
            prior_file = Path(out).resolve() / "priors" / f"offline_{prompts.stem}.pt"
            flags += ["--prior_encoder", "offline", "--prior_embeddings", str(prior_file), "--prompts", str(prompts)]
    return flags


def with_amp(name, amp):
    """``name``, with ``+<amp>`` under mixed precision."""
    return name if amp == "none" else f"{name}+{amp}"


def training_name(variant_name, augmentation, amp="none"):
    """The variant as trained: its name, with ``+<preset>_aug`` when the augmentation is not the recipe's and
    ``+<amp>`` under mixed precision."""
    name = variant_name if augmentation == RECIPE_FLAGS["augmentation"] else f"{variant_name}+{augmentation}_aug"
    return with_amp(name, amp)


def schedule_name(variant_name, fused_start_epoch, paper_fusion, base_lr=None, batch_size=None):
    """The variant with ``+fused<E>`` when its fused stage starts at epoch E of the paper's schedule instead of the
    paper's own (which keeps the plain name), ``+lr<rate>`` with a base learning rate ``base_lr`` (None: train.py's
    default) and ``+bs<N>`` with a batch size other than the recipe's (None: the recipe's)."""
    name = variant_name
    if fused_start_epoch is not None and fused_start_epoch != paper_fusion:
        name = f"{name}+fused{fused_start_epoch}"
    if base_lr is not None:
        name = f"{name}+lr{base_lr:g}"
    if batch_size is not None and batch_size != RECIPE_FLAGS["batch_size"]:
        name = f"{name}+bs{batch_size}"
    return name


def paper_schedule():
    """The paper's schedule, train.py's defaults: (epochs, contrast start, fused start)."""
    return (PAPER_SCHEDULE["max_epochs"], PAPER_SCHEDULE["start_contrast_epoch"],
            PAPER_SCHEDULE["region_fusion_start_epoch"])


def custom_lr(options):
    """``--base_lr`` when it differs from train.py's default, else None (the recipe's rate, no flag)."""
    default = train_script.parse_args([]).base_lr
    return None if options.base_lr is None or options.base_lr == default else options.base_lr


def _epoch_start_steps(trainer, weights, count):
    """Seconds of the first ``count`` real training steps of a fresh pass over the loader, as an epoch of training
    begins (the loader's workers start from an empty queue), finished on the device."""
    start = time.perf_counter()
    for _, batch in zip(range(count), trainer.loader):
        trainer.train_step(trainer.model, batch, weights)
    if trainer.ctx.device.type == "cuda":
        torch.cuda.synchronize(trainer.ctx.device)
    return time.perf_counter() - start


def _checkpoint_seconds(trainer):
    """Seconds for which the end-of-epoch save of last.pth holds up training (the snapshot; the writing runs in the
    background), written to a temporary folder; the write itself is waited for outside the timing."""
    with tempfile.TemporaryDirectory() as folder:
        if trainer.ctx.device.type == "cuda":
            torch.cuda.synchronize(trainer.ctx.device)
        start = time.perf_counter()
        trainer.checkpoint_writer.submit(trainer.checkpoint(all_rng_states(trainer.ctx)), [Path(folder) / "last.pth"])
        if trainer.ctx.device.type == "cuda":
            torch.cuda.synchronize(trainer.ctx.device)
        seconds = time.perf_counter() - start
        trainer.checkpoint_writer.wait()
        return seconds


def time_training_step(train_flags, warmup_steps, timed_steps):
    """Seconds per iteration of the variant's real training step (next batch from the loader, forward, losses,
    backward, optimizer) as training runs it: per stage of the paper's schedule, after ``warmup_steps``, the first
    ``timed_steps`` steps of a fresh pass over the loader (an epoch's start, when its workers refill from empty;
    at most a whole epoch), plus the epoch's checkpoint save spread over its steps; the stages weighted by their
    share of the run. Time it on an otherwise idle machine.

    Returns (seconds per step, {"fused 1, modality 0.5, contrast 0.05": seconds, ...}, iterations per epoch)."""
    args = train_script.parse_args(list(train_flags))
    ctx = setup_distributed(args.device)
    resolve_device_defaults(args, ctx.device)  # as train.py
    seed_everything(args.seed, args.deterministic)
    model, spec, _ = train_script.build(args, ctx)
    trainer = Trainer(args, ctx, model, spec, Path(args.output_dir))  # saves nothing: no provenance needed
    trainer.model.train()
    per_epoch = len(trainer.loader)
    timed_steps = min(timed_steps, per_epoch)
    per_stage, save_seconds = {}, None
    stages = stage_fractions(args.start_contrast_epoch, args.region_fusion_start_epoch, args.max_epochs)
    for first_epoch, _ in stages:
        weights = trainer.weights_for(first_epoch)
        if weights in per_stage:
            continue
        _epoch_start_steps(trainer, weights, min(warmup_steps, per_epoch))
        if save_seconds is None:  # once the optimizer holds its state, as in last.pth
            save_seconds = _checkpoint_seconds(trainer)
        per_stage[weights] = (_epoch_start_steps(trainer, weights, timed_steps) / timed_steps
                              + save_seconds / per_epoch)
    seconds = sum(fraction * per_stage[trainer.weights_for(epoch)] for epoch, fraction in stages)
    trainer.stop_loader_workers()
    del trainer, model
    gc.collect()
    described = {", ".join(f"{name} {value:g}" for name, value in weights._asdict().items()): stage_seconds
                 for weights, stage_seconds in per_stage.items()}
    return seconds, described, per_epoch


def checkout_independent(flags):
    """train.py flags with the repository's own prompt files named from the repository's root, so that the flags of
    a run planned in another checkout of it (a moved clone, a worktree) compare equal."""
    marker = f"{os.sep}priors{os.sep}prompts{os.sep}"
    return [f"<repository>/priors/prompts/{value.rsplit(marker, 1)[1]}" if marker in value else value
            for value in flags]


def plan_run(options, base_flags, run_dir):
    """Time the step (both modes, recorded), then iterations and the fitted schedule; reused from plan.json."""
    plan_file = run_dir / "plan.json"
    if plan_file.exists():
        plan = _read_json(plan_file, "run plan")
        if checkout_independent(plan.get("base_flags") or []) != checkout_independent(base_flags):
            raise BenchmarkError(f"{plan_file} was planned with other train.py flags; remove {run_dir} to start over")
        logger.info("reusing the plan in %s: %d iterations", plan_file, plan["iterations"])
        return plan
    logger.info("timing the training step: %d warm-up and %d timed steps per stage", options.warmup_steps,
                options.timed_steps)
    seconds, per_stage, per_epoch = time_training_step(base_flags + ["--output_dir", str(run_dir)],
                                                        options.warmup_steps, options.timed_steps)
    configure_logging()
    iterations = (budget_to_iterations(options.budget_minutes, seconds) if options.mode == "time"
                  else options.iterations)
    paper_epochs, paper_contrast, paper_fusion = paper_schedule()
    if options.fused_start_epoch is not None:
        paper_fusion = options.fused_start_epoch
    schedule = fit_schedule(iterations, per_epoch, paper_epochs, paper_contrast, paper_fusion)
    plan = {"base_flags": base_flags, "seconds_per_step": seconds, "seconds_per_stage": per_stage,
            "iterations_per_epoch": per_epoch, "iterations": iterations, "schedule": schedule,
            "timed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _write_json(plan_file, plan)
    logger.info("%.3f s per step -> %d iterations (%d per epoch): %s", seconds, iterations, per_epoch, schedule)
    return plan


def schedule_flags(schedule):
    return [flag for name, value in schedule.items() for flag in (f"--{name}", str(value))]


def read_metrics(path, test_cases):
    """test.py's metrics.csv: {case: {structure: (dice, hd95)}}; every test case scored in the original space."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    not_original = sorted({row["case"] for row in rows if row["space"] != "original"})
    if not_original:
        raise BenchmarkError(f"{path}: cases {not_original} were not scored in the original image space (is the "
                             "raw data still where prepare read it?)")
    metrics = {}
    for row in rows:
        metrics.setdefault(row["case"], {})[row["structure"]] = (float(row["dice"]), float(row["hd95"]))
    if sorted(metrics) != sorted(test_cases):
        raise BenchmarkError(f"{path} scores cases {sorted(metrics)}, expected the fold's {sorted(test_cases)}")
    return metrics


def _flag_value(flags, name):
    return flags[flags.index(name) + 1] if name in flags else None


def _defined(value):
    return None if math.isnan(value) else value


def run_folder(out, input_name, name, label, fold):
    """<out>/runs/<input>/<name>/<budget>/fold<k>: where a training (or an ensemble's scoring) lives."""
    return (Path(out) / "runs" / input_name / name / label.replace(" ", "_") / f"fold{fold}").resolve()


def member_augmentations(options):
    """The augmentation preset of each member: ``--augmentation`` is one preset for all, or a comma-separated list
    with one per member."""
    presets = options.augmentation.split(",")
    unknown = [preset for preset in presets if preset not in AUGMENTATIONS]
    if unknown:
        raise BenchmarkError(f"--augmentation {options.augmentation}: unknown preset(s) {unknown}; expected "
                             f"{sorted(AUGMENTATIONS)}, one for all members or one per member")
    if len(presets) == 1:
        return presets * options.members
    if len(presets) != options.members:
        raise BenchmarkError(f"--augmentation {options.augmentation}: {len(presets)} presets for --members "
                             f"{options.members}; give one for all members or one per member")
    return presets


def member_variants(options):
    """The benchmark variant of each member: ``--variant`` for all, or ``--member_variants``, a comma-separated
    list with one per member that starts with ``--variant``."""
    if options.member_variants is None:
        return [options.variant] * options.members
    names = options.member_variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise BenchmarkError(f"--member_variants {options.member_variants}: unknown variant(s) {unknown}; expected "
                             f"{sorted(VARIANTS)}")
    if len(names) != options.members or names[0] != options.variant:
        raise BenchmarkError(f"--member_variants {options.member_variants}: expected one variant per member "
                             f"(--members {options.members}), the first being --variant {options.variant}")
    return names


def ensemble_name(variant_names, augmentations, amp="none"):
    """The recorded name of the members' variants (as trained, one per member) and augmentations: the variant as
    trained, with ``+ensN`` for an ensemble; members with different augmentations give
    ``<variant>+ensN_<preset><count>...`` (e.g. immseg+ens4_strong3_nnunet1); members of different variants give
    ``<variant>_x<count>+...+ensN_<preset><count>...`` (e.g. immseg_x3+immseg_half_x3+ens6_strong4_nnunet2)."""
    variants = list(dict.fromkeys(variant_names))
    counts = "_".join(f"{preset}{augmentations.count(preset)}" for preset in dict.fromkeys(augmentations))
    if len(variants) > 1:
        mixed = "+".join(f"{variant}_x{variant_names.count(variant)}" for variant in variants)
        return with_amp(f"{mixed}+ens{len(augmentations)}_{counts}", amp)
    if len(set(augmentations)) == 1:
        trained = training_name(variants[0], augmentations[0], amp)
        return trained if len(augmentations) == 1 else f"{trained}+ens{len(augmentations)}"
    return with_amp(f"{variants[0]}+ens{len(augmentations)}_{counts}", amp)


def member_runs(out, input_name, variant_names, member_label, fold, augmentations, amp="none"):
    """[(run folder, (variant, augmentation), seed)] of an ensemble's members, given each member's variant (as
    trained) and augmentation. Seeds count up from the default one within each (variant, augmentation), so the first
    member of each is the standalone run of that training at the member budget (reused when already made) and a
    later one is the same training with another seed, in a folder of its own."""
    seed = RUN_DEFAULTS["seed"]
    trainings = list(zip(variant_names, augmentations))
    runs = []
    for number, (variant_name, augmentation) in enumerate(trainings):
        member_seed = seed + trainings[:number].count((variant_name, augmentation))
        name = training_name(variant_name, augmentation, amp)
        name = name if member_seed == seed else f"{name}+seed{member_seed}"
        runs.append((run_folder(out, input_name, name, member_label, fold), (variant_name, augmentation),
                     member_seed))
    return runs


def score_run(run_dir, root, save_dir, device, amp, extra_flags=(), save_nii=False):
    """test.py on a run's last checkpoint over the test cases of ``root``, scored in the original space, its
    predictions written as NIfTI only with ``save_nii``; its exit code."""
    return test_script.main(["--output_dir", str(run_dir), "--root_path", str(root), "--checkpoint", "last",
                             "--test_save_dir", str(save_dir), "--save_nii" if save_nii else "--no_save_nii",
                             "--device", device, "--amp", amp, *extra_flags])


def trained_amp(run_dir):
    """The precision a run trained in (its config.json), so that it is scored in the same."""
    return _read_json(run_dir / "config.json", "run configuration")["args"].get("amp") or "none"


def train_member(base_flags, plan, run_dir, seed, recorded):
    """Train one run to its plan unless done (recorded in the results or its training.json); training seconds."""
    if recorded:  # the same training, scored with other inference options: not trained again
        if not (run_dir / "last.pth").is_file():
            raise BenchmarkError(f"the results record the run {run_dir}, but it has no last.pth to score again")
        logger.info("%s is trained (its own run is in the results): not trained again", run_dir)
        return recorded[0]["train_seconds"]
    done = run_dir / "training.json"
    if done.is_file():
        logger.info("%s is trained (%s)", run_dir, done)
        return _read_json(done, "training record")["train_seconds"]
    schedule = plan["schedule"]
    start = time.perf_counter()
    code = train_script.main(base_flags + schedule_flags(schedule) + ["--seed", str(seed)] + [
        "--output_dir", str(run_dir), "--save_every", str(schedule["max_epochs"]), "--resume", "auto"])
    train_seconds = time.perf_counter() - start
    configure_logging()
    if code != 0:
        raise BenchmarkError(f"train.py failed in {run_dir} (exit {code}); see {run_dir / 'log.txt'}")
    _write_json(done, {"train_seconds": round(train_seconds, 1), "seed": seed, "iterations": schedule["max_iterations"],
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return train_seconds


def check_budget_flags(options, variant_names):
    if options.mode == "time" and options.budget_minutes is None:
        raise BenchmarkError("--mode time needs --budget_minutes")
    if options.mode == "iterations" and options.iterations is None:
        raise BenchmarkError("--mode iterations needs --iterations")
    if (options.mode == "time" and options.iterations is not None) or (
            options.mode == "iterations" and options.budget_minutes is not None):
        raise BenchmarkError("--budget_minutes goes with --mode time, --iterations with --mode iterations")
    if options.timed_steps < 1 or options.warmup_steps < 0:
        raise BenchmarkError(f"--timed_steps {options.timed_steps} must be at least 1 and --warmup_steps "
                             f"{options.warmup_steps} not negative")
    for name in dict.fromkeys(variant_names):
        variant = VARIANTS[name]
        if variant.config is not None and options.vit_name != RECIPE_FLAGS["vit_name"]:
            raise BenchmarkError(f"--vit_name {options.vit_name}: {name} trains its own configuration, "
                                 f"{variant.config}, in place of the recipe's {RECIPE_FLAGS['vit_name']}")
        baseline = "--model" in variant.flags  # a TransUNet: one head, no fused stage
        if options.heads != ("fused",) and baseline:
            raise BenchmarkError(f"--heads {','.join(options.heads)}: {name} has one head (only I-MMSeg's "
                                 "variants have modality heads)")
        if options.fused_start_epoch is not None and baseline:
            raise BenchmarkError(f"--fused_start_epoch: {name} has no fused head (only I-MMSeg's variants "
                                 "train one)")
    if options.fused_start_epoch is not None:
        paper_epochs = paper_schedule()[0]
        if not 0 <= options.fused_start_epoch < paper_epochs:
            raise BenchmarkError(f"--fused_start_epoch {options.fused_start_epoch}: expected an epoch of the paper's "
                                 f"schedule, 0 to {paper_epochs - 1}")
    if options.base_lr is not None and not options.base_lr > 0:
        raise BenchmarkError(f"--base_lr {options.base_lr:g}: expected a positive learning rate")
    if options.members < 1 or (options.mode == "iterations" and options.iterations < options.members):
        raise BenchmarkError(f"--members {options.members}: at least 1, and each member needs an iteration")


def run(options):
    """Plan, train, test and record one variant on one fold; skipped if the results already hold it. With
    ``--members N``, N runs of the variant (seeds, augmentations or, with ``--member_variants``, variants differ)
    share the budget and are scored as an ensemble."""
    setting, fold_dir, dataset = read_input(options.data, options.fold)
    variants = member_variants(options)
    check_budget_flags(options, variants)
    label = setting_label(options.mode, options.budget_minutes, options.iterations)
    member_options = argparse.Namespace(**vars(options))
    if options.mode == "time":
        member_options.budget_minutes = options.budget_minutes / options.members
    else:
        member_options.iterations = options.iterations // options.members
    member_label = setting_label(options.mode, member_options.budget_minutes, member_options.iterations)
    input_name = Path(options.data).resolve().name
    out = Path(options.out)
    results = out / "results.jsonl"
    augmentations = member_augmentations(options)
    named = {variant: schedule_name(variant, options.fused_start_epoch, paper_schedule()[2], custom_lr(options),
                                    options.batch_size)
             for variant in variants}
    scored_variant = ensemble_name([named[variant] for variant in variants], augmentations, options.amp)
    inference = [name for name, on in (("tta", options.tta), ("pp", options.postprocess)) if on]
    if options.heads != ("fused",):
        inference.append("heads_" + "_".join(options.heads))
    recorded_variant = "+".join([scored_variant, *inference])
    key = (input_name, recorded_variant, label, options.fold)
    earlier = read_results(results)
    if any(run_key(record) == key for record in earlier):
        logger.info("%s fold %d (%s, input %s) is already in %s: skipped", recorded_variant, options.fold, label,
                    input_name, results)
        return 0
    options.dataset = setting["dataset"]
    trained_variants = {named[variant]: variant for variant in variants}
    runs = member_runs(out, input_name, [named[variant] for variant in variants], member_label, options.fold,
                       augmentations, options.amp)
    plans = {}  # (variant, augmentation) -> its first member's folder, train.py flags and plan, shared by the others
    for run_dir, training, _ in runs:
        run_dir.mkdir(parents=True, exist_ok=True)
        if training not in plans:
            trained_variant, augmentation = training
            flags = recipe_flags(trained_variants[trained_variant], fold_dir, dataset["settings"]["crop_size"],
                                 argparse.Namespace(**{**vars(options), "augmentation": augmentation}), out)
            with run_folder_lock(run_dir):  # no timing beside a training of the same run
                plans[training] = run_dir, flags, plan_run(member_options, flags, run_dir)
            continue
        first, _, plan = plans[training]
        member_plan = run_dir / "plan.json"
        if not member_plan.exists():
            _write_json(member_plan, plan)
        elif _read_json(member_plan, "run plan") != plan:
            raise BenchmarkError(f"{member_plan} is not the plan of {first / 'plan.json'}: the members would train "
                                 f"differently; remove {run_dir} to start it over")
    train_seconds = 0.0
    for run_dir, training, seed in runs:
        trained = training_name(*training, options.amp)
        standalone = [] if seed != RUN_DEFAULTS["seed"] else [
            r for r in earlier if run_key(r) == (input_name, trained, member_label, options.fold)]
        _, flags, plan = plans[training]
        train_seconds += train_member(flags, plan, run_dir, seed, standalone)
    member_plans = [plans[training][2] for _, training, _ in runs]
    member_configs = [_flag_value(plans[training][1], "--vit_name") for _, training, _ in runs]
    base_flags, schedule = plans[runs[0][1]][1], member_plans[0]["schedule"]
    scored_dir = run_folder(out, input_name, scored_variant, label, options.fold)
    test_dir = scored_dir / "_".join(["test_last", *inference])
    inference_flags = ((["--tta"] if options.tta else []) + (["--postprocess"] if options.postprocess else [])
                       + ["--heads", ",".join(options.heads)])
    ensemble_flags = ["--ensemble", *[str(run_dir) for run_dir, _, _ in runs[1:]]] if options.members > 1 else []
    code = score_run(runs[0][0], fold_dir.resolve(), test_dir, options.device, options.amp,
                     inference_flags + ensemble_flags)
    if code != 0:
        raise BenchmarkError(f"test.py failed for {recorded_variant} fold {options.fold} (exit {code})")
    metrics = read_metrics(test_dir / "metrics.csv", dataset["split"]["test"])
    common = {"input": input_name, "variant": recorded_variant, "setting": label, "fold": options.fold,
              "inference": inference, "members": options.members,
              "mode": options.mode, "budget_minutes": options.budget_minutes,
              "iterations": sum(plan["schedule"]["max_iterations"] for plan in member_plans),
              "seconds_per_step": float(np.mean([plan["seconds_per_step"] for plan in member_plans])),
              "train_seconds": round(train_seconds, 1),
              **{name: schedule[name] for name in ("max_epochs", "start_contrast_epoch", "region_fusion_start_epoch")},
              "vit_name": ",".join(dict.fromkeys(member_configs)), "batch_size": options.batch_size,
              "augmentation": options.augmentation, "amp": options.amp,
              "base_lr": train_script.parse_args(base_flags).base_lr,
              "priors": _flag_value(base_flags, "--prior_embeddings"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_commit(), "machine": machine_description(options.device)}
    if options.members > 1:
        common["member_runs"] = [{"variant": variant, "augmentation": augmentation, "seed": seed,
                                  "iterations": plan["schedule"]["max_iterations"], "vit_name": config}
                                 for (_, (variant, augmentation), seed), plan, config
                                 in zip(runs, member_plans, member_configs)]
    records = [{**common, "case": case, "structure": structure, "dice": _defined(dice), "hd95": _defined(hd95)}
               for case, per_structure in sorted(metrics.items()) for structure, (dice, hd95) in per_structure.items()]
    append_results(results, records)
    logger.info("%s fold %d: %d cases, %d iterations in %.0f s of training (budget: %s) -> %s", recorded_variant,
                options.fold, len(metrics), common["iterations"], train_seconds, label, results)
    return 0


# ---------------------------------------------------------------------------------------------- fit
FIT_RESULTS = "fit.jsonl"


def link_training_cases(setting, data, fold, root):
    """A test.py data folder at ``root`` over fold ``fold``'s training cases, each case's volumes linked from the
    fold where it is a test case (cropped there as a test case: on a heart-centred input, around the centre that
    fold's locator found). Returns the cases."""
    cases = []
    for other, test_cases in enumerate(setting["folds"]):
        if other == fold:
            continue
        for case in test_cases:
            for modality in MODALITIES:
                source = (Path(data) / f"fold{other}" / modality / "test_vol_h5" / f"{case}.npy.h5").resolve()
                if not source.is_file():
                    raise BenchmarkError(f"{source} is missing (case {case}, a test case of fold {other}): "
                                         f"prepare {data} again")
                link = root / modality / "test_vol_h5" / source.name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source)
            cases.append(case)
    (root / "dataset.json").write_bytes((Path(data) / f"fold{fold}" / "dataset.json").read_bytes())
    (root / "test_vol.txt").write_text("".join(f"{case}\n" for case in cases))
    return cases


def fit(options):
    """Score one trained run on its fold's training cases and on its test cases, as ``run`` scores it (test.py in
    the original space, its own precision, no TTA): how far its Dice falls from the cases it learnt to those it
    did not. Appended to <out>/fit.jsonl (a run already there is skipped); then the table of that file."""
    setting, fold_dir, dataset = read_input(options.data, options.fold)
    input_name = Path(options.data).resolve().name
    run_dir = run_folder(options.out, input_name, options.variant, options.setting, options.fold)
    if not (run_dir / "last.pth").is_file():
        raise BenchmarkError(f"{run_dir} holds no trained run (last.pth): expected a training of --variant "
                             f"{options.variant} at --setting '{options.setting}' on fold {options.fold} (one run's "
                             "name, e.g. immseg+bf16 or immseg+bf16+seed1235, not an ensemble's)")
    results = Path(options.out) / FIT_RESULTS
    key = (input_name, options.variant, options.setting, options.fold)
    if any(run_key(record) == key for record in read_results(results)):
        logger.info("%s fold %d (%s) is already in %s: skipped", options.variant, options.fold, options.setting,
                    results)
    else:
        amp = trained_amp(run_dir)
        common = {"input": input_name, "variant": options.variant, "setting": options.setting,
                  "fold": options.fold, "iterations": _read_json(run_dir / "plan.json", "run plan")["schedule"][
                      "max_iterations"], "amp": amp,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "git_commit": git_commit()}
        records = []
        with tempfile.TemporaryDirectory(prefix="fit_") as scratch:
            training_root = Path(scratch) / "training_cases"
            training_cases = link_training_cases(setting, options.data, options.fold, training_root)
            for cases, root, expected in (("training", training_root, training_cases),
                                          ("test", fold_dir.resolve(), dataset["split"]["test"])):
                scores = Path(scratch) / f"scores_{cases}"
                code = score_run(run_dir, root, scores, options.device, amp)
                if code != 0:
                    raise BenchmarkError(f"test.py failed on the {cases} cases of {run_dir} (exit {code})")
                records += [{**common, "cases": cases, "case": case, "structure": structure, "dice": _defined(dice),
                             "hd95": _defined(hd95)}
                            for case, per_structure in sorted(read_metrics(scores / "metrics.csv", expected).items())
                            for structure, (dice, hd95) in per_structure.items()]
        append_results(results, records)
        logger.info("%s fold %d (%s): %d training and %d test cases -> %s", options.variant, options.fold,
                    options.setting, len(training_cases), len(dataset["split"]["test"]), results)
    return fit_report(options.out)


def fit_table(records):
    """Markdown: per input, variant and budget (iterations-mode settings of a variant pooled over its folds), the
    mean Dice on the training cases, on the test cases and their difference, per structure."""
    groups = {}
    for record in records:
        budget = record["setting"] if record["setting"].startswith("time") else "iterations"
        groups.setdefault((record["input"], record["variant"], budget), []).append(record)
    header = ["variant", "input", "budget", "folds", "iterations", *(
        f"{STRUCTURE_NAMES[s]}: training / test (drop)" for s in STRUCTURE_NAMES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (input_name, variant, budget), group in sorted(groups.items()):
        seen = [(r["fold"], r["cases"], r["case"], r["structure"]) for r in group]
        if len(seen) != len(set(seen)):
            raise BenchmarkError(f"{variant} ({input_name}, {budget}) scores a case twice on one fold (two "
                                 "iterations-mode settings?): keep one per fold in the fit results")
        cells = []
        for structure in STRUCTURE_NAMES:
            dice = {cases: [r["dice"] * 100 for r in group if r["cases"] == cases and r["structure"] == structure
                            and r["dice"] is not None] for cases in ("training", "test")}
            if not (dice["training"] and dice["test"]):
                cells.append("-")
                continue
            training, test = np.mean(dice["training"]), np.mean(dice["test"])
            cells.append(f"{training:.2f} / {test:.2f} ({training - test:.2f})")
        folds = ",".join(str(f) for f in sorted({r["fold"] for r in group}))
        iterations = _span([r["iterations"] for r in group], "{:d}")
        lines.append("| " + " | ".join([variant, input_name, budget, folds, iterations, *cells]) + " |")
    return "\n".join(lines)


def records_or_refuse(results, command):
    """The records of a results file, refused when there are none yet."""
    records = read_results(results)
    if not records:
        raise BenchmarkError(f"{results} holds no records yet: run {command} first")
    return records


def publish(text, path):
    """A Markdown table: written atomically to ``path`` and to stdout."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    sys.stdout.write(text)
    logger.info("table written to %s", path)


def fit_report(out):
    results = Path(out) / FIT_RESULTS
    records = records_or_refuse(results, "fit")
    publish("\n".join([f"# Training against test cases ({results})", "",
                       "Mean Dice (%) over the cases of all folds scored: on each run's own training cases, on its "
                       "test cases, and the drop from the first to the second.", "", fit_table(records), ""]),
            Path(out) / "fit.md")
    return 0


# ---------------------------------------------------------------------------------------------- agreement
AGREEMENT_RESULTS = "agreement.jsonl"


def pairwise_agreement(predictions, structure):
    """Mean Dice between the masks of a structure in every two of the members' label maps; None when every pair
    has both masks empty."""
    masks = [np.isin(prediction, STRUCTURES[structure]) for prediction in predictions]
    values = [2 * np.logical_and(first, second).sum() / (first.sum() + second.sum())
              for first, second in itertools.combinations(masks, 2) if first.any() or second.any()]
    return float(np.mean(values)) if values else None


def ensemble_members(scored_dir):
    """The run folders of an ensemble scored by ``run``, from its test_info.json."""
    info_file = scored_dir / "test_last" / "test_info.json"
    if not info_file.is_file():
        raise BenchmarkError(f"{info_file} is missing: expected an ensemble scored by run (its plain scoring, "
                             "without --tta, --postprocess or --heads)")
    info = _read_json(info_file, "ensemble scoring")
    members = [Path(checkpoint).parent for checkpoint in info.get("ensemble") or []]
    if len(members) < 2:
        raise BenchmarkError(f"{info_file} scores one run, not an ensemble: agreement needs two members or more")
    return members, info


def agreement(options):
    """Score each member of a recorded ensemble alone on the fold's test cases (as ``run`` scores: test.py, the
    original space, each member's own precision) and measure how far the members agree: per case and structure,
    the members' Dice, the ensemble's recorded Dice and the mean Dice between every two members' predictions.
    Appended to <out>/agreement.jsonl (an ensemble already there is skipped); then the table of that file."""
    _, fold_dir, dataset = read_input(options.data, options.fold)
    input_name = Path(options.data).resolve().name
    key = (input_name, options.variant, options.setting, options.fold)
    ensemble = {(r["case"], r["structure"]): r["dice"] for r in read_results(Path(options.out) / "results.jsonl")
                if run_key(r) == key}
    if not ensemble:
        raise BenchmarkError(f"{Path(options.out) / 'results.jsonl'} holds no records of {options.variant} "
                             f"({options.setting}, input {input_name}) on fold {options.fold}: run it first")
    members, info = ensemble_members(run_folder(options.out, input_name, options.variant, options.setting,
                                                options.fold))
    results = Path(options.out) / AGREEMENT_RESULTS
    if any(run_key(record) == key for record in read_results(results)):
        logger.info("%s fold %d (%s) is already in %s: skipped", options.variant, options.fold, options.setting,
                    results)
        return agreement_report(options.out)
    cases = dataset["split"]["test"]
    member_dice, predictions = [], {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="agreement_") as scratch:
        for number, member in enumerate(members):
            amp = trained_amp(member)
            scores = Path(scratch) / f"member{number}"
            code = score_run(member, fold_dir.resolve(), scores, options.device, amp,
                             ["--heads", ",".join(info.get("heads") or ["fused"])], save_nii=True)
            if code != 0:
                raise BenchmarkError(f"test.py failed on member {member} (exit {code})")
            member_dice.append(read_metrics(scores / "metrics.csv", cases))
            for case in cases:
                predictions[case].append(np.asarray(nib.load(scores / f"{case}_pred.nii.gz").dataobj))
    common = {"input": input_name, "variant": options.variant, "setting": options.setting, "fold": options.fold,
              "members": [str(member) for member in members],
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_commit()}
    records = [{**common, "case": case, "structure": structure,
                "member_dice": [_defined(scores[case][structure][0]) for scores in member_dice],
                "ensemble_dice": ensemble[case, structure],
                "agreement": pairwise_agreement(predictions[case], structure)}
               for case in sorted(cases) for structure in STRUCTURE_NAMES]
    append_results(results, records)
    logger.info("%s fold %d (%s): %d members on %d cases -> %s", options.variant, options.fold, options.setting,
                len(members), len(cases), results)
    return agreement_report(options.out)


def _mean_defined(values):
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def agreement_table(records):
    """Markdown: per input, ensemble and budget, over the cases of its folds, per structure: the members' mean Dice,
    the ensemble's, the gain of the ensemble over its members, and the members' mean pairwise agreement (Dice)."""
    groups = {}
    for record in records:
        groups.setdefault((record["input"], record["variant"], record["setting"]), []).append(record)
    header = ["ensemble", "input", "budget", "folds", "members", *(
        f"{STRUCTURE_NAMES[s]}: members / ensemble (gain); agreement" for s in STRUCTURE_NAMES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (input_name, variant, budget), group in sorted(groups.items()):
        cells = []
        for structure in STRUCTURE_NAMES:
            rows = [r for r in group if r["structure"] == structure and r["ensemble_dice"] is not None]
            members = _mean_defined([_mean_defined(r["member_dice"]) for r in rows])
            together = _mean_defined([r["ensemble_dice"] for r in rows])
            agreed = _mean_defined([r["agreement"] for r in group if r["structure"] == structure])
            if members is None or together is None:
                cells.append("-")
                continue
            agreed_text = "-" if agreed is None else f"{agreed * 100:.2f}"
            cells.append(f"{members * 100:.2f} / {together * 100:.2f} ({(together - members) * 100:+.2f}); "
                         f"{agreed_text}")
        folds = ",".join(str(f) for f in sorted({r["fold"] for r in group}))
        count = _span([len(r["members"]) for r in group], "{:d}")
        lines.append("| " + " | ".join([variant, input_name, budget, folds, count, *cells]) + " |")
    return "\n".join(lines)


def agreement_report(out):
    results = Path(out) / AGREEMENT_RESULTS
    records = records_or_refuse(results, "agreement")
    publish("\n".join([f"# How far an ensemble's members agree ({results})", "",
                       "Mean Dice (%) over the cases of all folds scored: of the members alone (their mean), of the "
                       "ensemble, the ensemble's gain over its members, and the mean Dice between every two members' "
                       "predictions (agreement; cases where both predictions of a pair are empty left out).", "",
                       agreement_table(records), ""]),
            Path(out) / "agreement.md")
    return 0


# ---------------------------------------------------------------------------------------------- report
def _mean_std(entry, key, scale):
    mean, std = entry[key], entry[f"{key}_std"]
    return "n/a" if mean is None else f"{mean * scale:.2f} ± {std * scale:.2f}"


def _span(values, fmt):
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def paired_differences(records, reference_records, structure, metric):
    """Per-case differences (variant - reference) of one structure, over the cases where both are defined."""
    reference = {(r["fold"], r["case"]): r[metric] for r in reference_records if r["structure"] == structure}
    return [r[metric] - reference[(r["fold"], r["case"])] for r in records if r["structure"] == structure
            and r[metric] is not None and reference.get((r["fold"], r["case"])) is not None]


def bootstrap_interval(differences, level=0.95, resamples=10000, seed=0):
    """Percentile bootstrap interval of the mean paired difference, resampling cases (seeded: a report is
    reproducible)."""
    values = np.asarray(differences, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    low, high = np.quantile(values[draws].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def signed_rank_p(differences):
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (1 when no case differs)."""
    if not any(differences):
        return 1.0
    return float(scipy.stats.wilcoxon(differences).pvalue)


def dice_comparison_cells(records, reference_records, structure):
    """Report cells against the reference: Δ Dice, its 95% interval, better Dice, Wilcoxon p, Δ HD95."""
    dice = paired_differences(records, reference_records, structure, "dice")
    hd95 = paired_differences(records, reference_records, structure, "hd95")
    if not dice:
        return ["n/a", "n/a", "0/0", "n/a", f"{np.mean(hd95):+.2f}" if hd95 else "n/a"]
    low, high = bootstrap_interval(dice)
    p_value = signed_rank_p(dice)
    return [f"{np.mean(dice) * 100:+.2f}", f"{low * 100:+.2f} to {high * 100:+.2f}",
            f"{sum(d > 0 for d in dice)}/{len(dice)}", "<0.001" if p_value < 0.001 else f"{p_value:.3f}",
            f"{np.mean(hd95):+.2f}" if hd95 else "n/a"]


def _budget_groups(records, pool_budgets):
    """{(input, budget, variant): records}; with ``pool_budgets`` a variant's budgets of one mode (time or
    iterations) on an input are one group, labelled by them all (runs matched fold by fold, e.g. equal iterations
    per fold), when each fold has one of them; a variant with several budgets on a fold keeps a group per budget."""
    def pool(record):
        return record["input"], record["variant"], record["setting"].split()[0]

    per_fold = {}
    for record in records:
        per_fold.setdefault(pool(record), {}).setdefault(record["fold"], set()).add(record["setting"])
    pooled = {key: " + ".join(sorted(set().union(*folds.values()))) for key, folds in per_fold.items()
              if pool_budgets and all(len(budgets) == 1 for budgets in folds.values())}
    groups = {}
    for record in records:
        budget = pooled.get(pool(record), record["setting"])
        groups.setdefault((record["input"], budget, record["variant"]), []).append(record)
    for (input_name, budget, variant), group in groups.items():
        seen = [(r["fold"], r["case"], r["structure"]) for r in group]
        if len(set(seen)) != len(seen):
            raise BenchmarkError(f"{variant} on {input_name} at {budget} scores a case more than once")
    return groups


def report_table(records, reference="immseg", reference_setting=None, pool_budgets=False):
    """The Markdown table: one row per (input, budget, variant) and structure, paired against ``reference`` on the
    same input at ``reference_setting`` (default: each row's own budget). ``pool_budgets``: one row per (input,
    variant, mode) over its budgets (see ``_budget_groups``), paired with the reference's row on that input at
    ``reference_setting`` (default: its one row there)."""
    groups = _budget_groups(records, pool_budgets)
    reference_groups = {}
    for key, group in groups.items():
        if key[2] == reference:
            reference_groups.setdefault(key[0], {})[key[1]] = group
    ambiguous = sorted(name for name, found in reference_groups.items() if len(found) > 1)
    if pool_budgets and reference_setting is None and ambiguous:
        raise BenchmarkError(f"--pool_budgets: {reference} has rows at several budgets on {ambiguous} "
                             f"({', '.join(sorted(reference_groups[ambiguous[0]]))}): name one with --reference_setting")

    def reference_group_of(key):
        found = reference_groups.get(key[0], {})
        if reference_setting is not None:
            return found.get(reference_setting)
        return next(iter(found.values()), None) if pool_budgets else found.get(key[1])

    order = list(VARIANTS)
    keys = sorted(groups, key=lambda k: (k[0], k[1], order.index(k[2]) if k[2] in order else len(order), k[2]))
    lines = [f"| variant | input | budget | folds | structure | cases | Dice (%) | HD95 (mm) | iterations | s / step "
             f"| training min | Δ Dice vs {reference} | 95% interval | better Dice | p (Wilcoxon) "
             f"| Δ HD95 vs {reference} |",
             "|" + " --- |" * 16]
    for key in keys:
        group = groups[key]
        reference_group = reference_group_of(key)
        per_case = {}
        for record in group:
            per_case.setdefault((record["fold"], record["case"]), dict.fromkeys(STRUCTURES, (math.nan, math.nan)))[
                record["structure"]] = (
                math.nan if record["dice"] is None else record["dice"],
                math.nan if record["hd95"] is None else record["hd95"])
        summary = summarise(list(per_case.values()))
        folds = sorted({r["fold"] for r in group})
        runs = {r["fold"]: r for r in group}
        iterations = _span([runs[f]["iterations"] for f in folds], "{:d}")
        seconds = _span([runs[f]["seconds_per_step"] for f in folds], "{:.3f}")
        minutes = _span([runs[f]["train_seconds"] / 60 for f in folds], "{:.1f}")
        for structure in STRUCTURES:
            cells = [""] * 5
            if reference_group is not None and group is not reference_group:
                cells = dice_comparison_cells(group, reference_group, structure)
            entry = summary[structure]
            lines.append(f"| {key[2]} | {key[0]} | {key[1]} | {','.join(map(str, folds))} | "
                         f"{STRUCTURE_NAMES[structure]} | {entry['n']} | {_mean_std(entry, 'dice', 100)} | "
                         f"{_mean_std(entry, 'hd95', 1)} | {iterations} | {seconds} | {minutes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out, reference="immseg", path=None, reference_setting=None, pool_budgets=False):
    results = Path(out) / "results.jsonl"
    records = records_or_refuse(results, "the benchmark")
    commits = sorted({r["git_commit"] or "unknown" for r in records})
    dates = sorted(r["date"] for r in records)
    text = "\n".join([
        f"# MyoPS 2020 benchmark ({results})", "",
        f"Runs from {dates[0]} to {dates[-1]}, commit(s) {', '.join(commits)}. Mean ± standard deviation over all "
        "cases of all folds, undefined values left out (`cases` counts all). Δ: mean per-case paired difference "
        f"against {reference} on the same input at "
        f"{reference_setting or ('its budget(s), pooled' if pool_budgets else 'the same budget')} (Dice in points); better "
        "Dice: cases where the variant's Dice is higher, of the cases where both are defined; 95% interval: percentile "
        "bootstrap of the mean Δ Dice over those cases (10000 resamples, seed 0); p: two-sided Wilcoxon signed-rank "
        "test of the per-case Dice differences.", "",
        report_table(records, reference, reference_setting, pool_budgets), ""])
    publish(text, Path(path) if path else Path(out) / "report.md")
    return text


def label_volumes_ml(dataset, src, case_ids, structure):
    """Volume (ml) of ``structure`` in each case's reference label, read from the raw cases under ``src``."""
    finder, label_map, _ = preprocess_data.DATASETS[dataset]
    found = {case.case_id: case for case in finder(src)}
    missing = sorted(set(case_ids) - set(found))
    if missing:
        raise BenchmarkError(f"{src} holds no case {', '.join(missing)}: give the raw folder the split was made from")
    volumes = {}
    for case_id in case_ids:
        case = load_case(found[case_id], label_map)
        voxel_ml = float(np.prod(case.spacing)) / 1000
        volumes[case_id] = float(np.isin(case.label, STRUCTURES[structure]).sum()) * voxel_ml
    return volumes


def case_comparison(records, variant, reference, structure, volumes):
    """Markdown: the per-case Dice of ``variant`` and ``reference`` in one structure, ordered by the structure's
    label volume, then the mean difference in the smaller and the larger half and its rank correlation with the
    volume (does a gap follow the structure's size?)."""
    def dice_by_case(name):
        return {(r["input"], r["setting"], r["fold"], r["case"]): r["dice"] for r in records
                if r["variant"] == name and r["structure"] == structure and r["dice"] is not None}

    ours, theirs = dice_by_case(variant), dice_by_case(reference)
    keys = sorted(set(ours) & set(theirs), key=lambda key: (volumes[key[3]], key))
    if len({key[:2] for key in keys}) > 1:
        raise BenchmarkError(f"{variant} and {reference} are both recorded on several inputs or budgets "
                             f"({sorted({key[:2] for key in keys})}); compare one at a time")
    if len(keys) < 4:
        raise BenchmarkError(f"{variant} and {reference} share {len(keys)} cases with a defined {structure} Dice; "
                             "at least 4 are needed")
    lines = [f"| case | fold | {STRUCTURE_NAMES[structure]} (ml) | {variant} | {reference} | Δ |", "|" + " --- |" * 6]
    differences = []
    for key in keys:
        differences.append(100 * (ours[key] - theirs[key]))
        lines.append(f"| {key[3]} | {key[2]} | {volumes[key[3]]:.2f} | {100 * ours[key]:.2f} | {100 * theirs[key]:.2f} "
                     f"| {differences[-1]:+.2f} |")
    half = len(keys) // 2
    lines.append("")
    for name, part in (("smaller", slice(0, half)), ("larger", slice(half, None))):
        chosen, sizes = differences[part], [volumes[key[3]] for key in keys[part]]
        lines.append(f"- {name} {len(chosen)} ({min(sizes):.2f}-{max(sizes):.2f} ml): Δ {np.mean(chosen):+.2f}, "
                     f"{variant} better in {sum(d > 0 for d in chosen)} of {len(chosen)}")
    rho, p_value = scipy.stats.spearmanr([volumes[key[3]] for key in keys], differences)
    lines.append(f"- Spearman correlation of Δ with the volume: {rho:+.2f} (p {p_value:.2f}, {len(keys)} cases)")
    return "\n".join(lines) + "\n"


def compare_cases(out, variant, reference, structure, src, dataset="MyoPS2020"):
    records = read_results(Path(out) / "results.jsonl")
    case_ids = sorted({r["case"] for r in records if r["variant"] in (variant, reference)})
    for name in (variant, reference):
        if not any(r["variant"] == name for r in records):
            raise BenchmarkError(f"{Path(out) / 'results.jsonl'} holds no records of {name}")
    text = case_comparison(records, variant, reference, structure, label_volumes_ml(dataset, src, case_ids, structure))
    sys.stdout.write(text)
    return text


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    split = commands.add_parser("split", help="seeded k-fold split of the cases, written once and reused")
    split.add_argument("--src", type=Path, required=True, help="raw MyoPS 2020 folder")
    split.add_argument("--dataset", default="MyoPS2020", choices=DATASETS, help="raw layout (Phantom: MyoPS380's)")
    split.add_argument("--split_file", type=Path, required=True)
    split.add_argument("--folds", type=int, default=3)
    split.add_argument("--seed", type=int, default=1234)

    prep = commands.add_parser("prepare", help="preprocess every fold (flags after -- go to preprocess_data.py)")
    prep.add_argument("--src", type=Path, required=True, help="raw folder the split was made from")
    prep.add_argument("--split_file", type=Path, required=True)
    prep.add_argument("--data", type=Path, required=True, help="output folder for this input setting")
    prep.add_argument("--spacing", type=float, default=RECIPE_INPUT["spacing"], help="in-plane mm (recipe: 1.0)")
    prep.add_argument("--crop_size", type=int, default=RECIPE_INPUT["crop_size"], help="pixels (recipe: 176)")
    prep.add_argument("--locator", type=Path, default=None,
                      help="crop around the heart: folder of a coarse run per fold (<out>/runs/<input>/<variant>/"
                           "<budget>, holding fold0, fold1, ...) that locates each fold's test cases")

    go = commands.add_parser("run", help="time, train, test and record one variant on one fold")
    go.add_argument("--data", type=Path, required=True, help="folder written by prepare")
    go.add_argument("--out", type=Path, required=True, help="benchmark folder: results.jsonl, runs/, priors/")
    go.add_argument("--variant", required=True, choices=list(VARIANTS),
                    help="; ".join(f"{name}: {variant.description}" for name, variant in VARIANTS.items()))
    go.add_argument("--fold", type=int, required=True)
    go.add_argument("--mode", default="time", choices=["time", "iterations"],
                    help="time: --budget_minutes of training; iterations: a fixed --iterations")
    go.add_argument("--budget_minutes", type=float, default=None)
    go.add_argument("--iterations", type=int, default=None)
    go.add_argument("--biomedclip_priors", type=Path, default=None,
                    help="BiomedCLIP prior file (python -m priors.encode) for the I-MMSeg variants")
    go.add_argument("--names_only_priors", type=Path, default=None,
                    help="prior file of priors/prompts/names_only.json (default: encoded by the offline encoder)")
    go.add_argument("--vit_name", default=RECIPE_FLAGS["vit_name"], help="configuration (recipe: compact)")
    go.add_argument("--batch_size", type=int, default=RECIPE_FLAGS["batch_size"],
                    help="train.py's --batch_size (recipe: 8); another is recorded as <variant>+bs<N>")
    go.add_argument("--augmentation", default=RECIPE_FLAGS["augmentation"], metavar="{" + ",".join(AUGMENTATIONS) + "}",
                    help="train.py --augmentation (recipe: strong); another preset is recorded as variant "
                         "<variant>+<preset>_aug. With --members, one preset for all or a comma-separated list with "
                         "one per member (e.g. strong,strong,strong,nnunet: <variant>+ens4_strong3_nnunet1)")
    go.add_argument("--num_workers", type=int, default=None, help="train.py's loader processes (its default)")
    go.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    go.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                    help="train.py's and test.py's --amp (recipe: none); bf16 is also faster on CPUs with bf16 "
                         "instructions. Recorded as variant <variant>+<amp>")
    go.add_argument("--members", type=int, default=1,
                    help="train N runs of the variant (seeds differ), each with 1/N of the budget, and score their "
                         "ensemble (probabilities averaged): recorded as <variant>+ensN at the whole budget")
    go.add_argument("--member_variants", default=None, metavar="VARIANT,...",
                    help="with --members N, one variant per member, the first being --variant (e.g. "
                         "immseg,immseg,immseg,immseg_half,immseg_half,immseg_half); each (variant, augmentation) is "
                         "timed and planned once, its seeds count up, and the ensemble is recorded as "
                         "<variant>_x<count>+...+ensN_<preset><count>...")
    go.add_argument("--tta", action="store_true",
                    help="score with test.py --tta (flip averaging); recorded as variant <variant>+tta, the training "
                         "reused if the plain variant is already recorded")
    go.add_argument("--postprocess", action="store_true",
                    help="score with test.py --postprocess (one connected myocardium); recorded as <variant>+pp")
    go.add_argument("--heads", default=("fused",), type=test_script.head_list,
                    help="score with test.py --heads (I-MMSeg heads averaged, e.g. fused,LGE,T2w); recorded as "
                         "<variant>+heads_<names>, the training reused")
    go.add_argument("--fused_start_epoch", type=int, default=None,
                    help="epoch of the paper's 300 at which the fused head starts training, scaled to the run like "
                         "the paper's 100 (the default); recorded as <variant>+fused<E>")
    go.add_argument("--base_lr", type=float, default=None,
                    help="train.py's base learning rate (its default: 0.001); another is recorded as <variant>+lr<rate>")
    go.add_argument("--warmup_steps", type=int, default=6, help="untimed steps per stage before timing")
    go.add_argument("--timed_steps", type=int, default=20,
                    help="timed steps per stage from an epoch's start (at most an epoch; the save is added)")

    rep = commands.add_parser("report", help="the Markdown table of <out>/results.jsonl")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--reference", default="immseg", help="variant the paired differences are taken against")
    rep.add_argument("--reference_setting", default=None,
                     help="the reference's budget, e.g. 'time 38 min' when a heart-centred input's fine runs got "
                          "the budget less the locator's minutes (default: each row's own budget)")
    rep.add_argument("--pool_budgets", action="store_true",
                     help="one row per variant and mode over its budgets when each fold has one (e.g. equal "
                          "iterations fitted per fold), paired with the reference's row (--reference_setting: the "
                          "one at that budget, as labelled in the table)")
    rep.add_argument("--report_file", type=Path, default=None, help="default: <out>/report.md")

    fit_parser = commands.add_parser("fit", help="Dice of one trained run on its fold's training cases against its "
                                                 "test cases (-> <out>/fit.jsonl, <out>/fit.md)")
    fit_parser.add_argument("--data", type=Path, required=True, help="folder written by prepare")
    fit_parser.add_argument("--out", type=Path, required=True, help="benchmark folder the run trained in")
    fit_parser.add_argument("--variant", required=True,
                            help="a trained run's name under <out>/runs/<input>, e.g. immseg+bf16")
    fit_parser.add_argument("--setting", required=True, help="its budget as recorded, e.g. 'time 6 min'")
    fit_parser.add_argument("--fold", type=int, required=True)
    fit_parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])

    agree = commands.add_parser("agreement", help="each member of a recorded ensemble scored alone, and how far the "
                                                  "members' predictions agree (-> <out>/agreement.jsonl, .md)")
    agree.add_argument("--data", type=Path, required=True, help="folder written by prepare")
    agree.add_argument("--out", type=Path, required=True, help="benchmark folder the ensemble was scored in")
    agree.add_argument("--variant", required=True,
                       help="an ensemble's recorded name, e.g. immseg+ens3_strong2_nnunet1+bf16")
    agree.add_argument("--setting", required=True, help="its budget as recorded, e.g. 'time 36 min'")
    agree.add_argument("--fold", type=int, required=True)
    agree.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])

    cases = commands.add_parser("cases", help="per-case Dice of two variants in one structure, by its label volume")
    cases.add_argument("--out", type=Path, required=True)
    cases.add_argument("--variant", required=True)
    cases.add_argument("--reference", required=True)
    cases.add_argument("--structure", default="scar", choices=list(STRUCTURE_NAMES))
    cases.add_argument("--src", type=Path, required=True, help="raw folder the split was made from (the labels)")
    cases.add_argument("--dataset", default="MyoPS2020", choices=DATASETS, help="raw layout (Phantom: MyoPS380's)")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "prepare":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    args.preprocess_flags = [flag for flag in extra if flag != "--"]
    return args


def main(argv=None):
    configure_logging()
    args = parse_args(argv)
    try:
        if args.command == "split":
            write_split(args.dataset, args.src, args.split_file, args.folds, args.seed)
        elif args.command == "prepare":
            prepare(args.src, args.split_file, args.data, args.spacing, args.crop_size, args.preprocess_flags,
                    args.locator)
        elif args.command == "run":
            return run(args)
        elif args.command == "fit":
            return fit(args)
        elif args.command == "agreement":
            return agreement(args)
        elif args.command == "cases":
            compare_cases(args.out, args.variant, args.reference, args.structure, args.src, args.dataset)
        else:
            report(args.out, args.reference, args.report_file, args.reference_setting, args.pool_budgets)
    except (ValueError, FileNotFoundError, EncoderUnavailableError) as error:  # the project's errors name the cause
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
