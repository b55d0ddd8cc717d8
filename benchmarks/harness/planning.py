"""A run's plan: its training step timed as training runs it, the wall-clock budget turned into iterations, and the
paper's schedule fitted to them (plan.json, reused by a resumed run)."""
import datetime
import gc
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness.records import BenchmarkError, read_json, write_json
from benchmarks.harness.variants import paper_schedule
from engine.distributed import all_rng_states, seed_everything, setup_distributed
from engine.options import resolve_device_defaults, stage_fractions
from engine.runs import configure_logging
from engine.training import build, parse_training_args
from trainer import Trainer, weights_described

logger = logging.getLogger("benchmark")


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
    args = parse_training_args(list(train_flags))
    ctx = setup_distributed(args.device)
    resolve_device_defaults(args, ctx.device)  # as train.py
    seed_everything(args.seed, args.deterministic)
    model, spec, _ = build(args, ctx)
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
    described = {weights_described(weights): stage_seconds
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
        plan = read_json(plan_file, "run plan")
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
    write_json(plan_file, plan)
    logger.info("%.3f s per step -> %d iterations (%d per epoch): %s", seconds, iterations, per_epoch, schedule)
    return plan


def schedule_flags(schedule):
    return [flag for name, value in schedule.items() for flag in (f"--{name}", str(value))]
