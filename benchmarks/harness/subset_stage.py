"""A subset stage variant on one fold (e.g. immseg_subsets): the variant it is trained on (``stage_of``) run first,
as ``run`` runs it, at the same fold and budget in the same benchmark folder (trained and recorded if it is not
yet), then the stage trained on that run's last checkpoint (train.py --subsets_from), scored with test.py (any
--sequences) and recorded like any run, with the stage's own iterations and training seconds."""
import argparse
import logging
import math
from pathlib import Path

from benchmarks.harness.prepare import read_input
from benchmarks.harness.records import BenchmarkError, append_results, read_json, read_results, run_key
from benchmarks.harness.run import (check_budget_flags, inference_names, read_metrics, run, run_folder, run_records,
                                    score_run, train_once)
from benchmarks.harness.variants import (VARIANTS, custom_lr, machine_flags, paper_schedule, recipe_flags,
                                         schedule_name, setting_label, training_name)
from datasets.vocabulary import MODALITIES
from engine.options import RUN_DEFAULTS
from subset_trainer import train_subset_stage

logger = logging.getLogger("benchmark")


def check_stage_options(options):
    """A subset stage is one training on one complete run, scored by its fused head."""
    if options.members != 1 or options.member_variants is not None:
        raise BenchmarkError(f"--variant {options.variant} is a subset stage on one run: no --members or "
                             "--member_variants")
    if options.heads != ("fused",):
        raise BenchmarkError(f"--heads {','.join(options.heads)}: the subset stage serves the fused head alone")
    if options.stage_iterations is not None and options.stage_iterations < 1:
        raise BenchmarkError(f"--stage_iterations {options.stage_iterations}: expected a positive number")
    if options.stage_base_lr is not None and not options.stage_base_lr > 0:
        raise BenchmarkError(f"--stage_base_lr {options.stage_base_lr}: expected a positive learning rate")


def trained_name(options, variant_name, suffixes=()):
    """The name under which a training of ``variant_name`` is recorded and foldered: its schedule's name, then
    ``suffixes``, then its augmentation and precision."""
    named = schedule_name(variant_name, options.fused_start_epoch, paper_schedule()[2], custom_lr(options),
                          options.batch_size)
    return training_name("".join([named, *suffixes]), options.augmentation, options.amp)


def complete_run(options, input_name, label):
    """Run (or find recorded) the variant the stage is trained on, as ``run`` does for it alone: its run folder,
    train.py flags, plan and results records at the stage's fold and budget (``label``) on ``input_name``."""
    variant = VARIANTS[options.variant]
    complete_options = argparse.Namespace(**{**vars(options), "variant": variant.stage_of, "sequences": MODALITIES,
                                             "missing": "leave_out", "tta": False, "postprocess": False})
    if run(complete_options) != 0:
        raise BenchmarkError(f"the complete run of {variant.stage_of} on fold {options.fold} failed")
    setting, fold_dir, dataset = read_input(options.data, options.fold)
    trained = trained_name(options, variant.stage_of)
    run_dir = run_folder(options.out, input_name, trained, label, options.fold)
    records = [r for r in read_results(Path(options.out) / "results.jsonl")
               if run_key(r) == (input_name, trained, label, options.fold)]
    flags = recipe_flags(variant.stage_of, fold_dir, dataset["settings"]["crop_size"],
                         argparse.Namespace(**{**vars(options), "dataset": setting["dataset"]}), options.out)
    return run_dir, flags, read_json(run_dir / "plan.json", "run plan"), records


def run_subset_stage(options):
    """Train (unless done), score and record the subset stage variant ``options.variant`` on one fold; skipped if
    the results already hold it."""
    check_stage_options(options)
    check_budget_flags(options, [options.variant])
    _, fold_dir, dataset = read_input(options.data, options.fold)
    label = setting_label(options.mode, options.budget_minutes, options.iterations)
    input_name = Path(options.data).resolve().name
    results = Path(options.out) / "results.jsonl"
    suffixes = ([f"+stage{options.stage_iterations}"] if options.stage_iterations is not None else []) + (
        [f"+stagelr{options.stage_base_lr:g}"] if options.stage_base_lr is not None else [])
    trained = trained_name(options, options.variant, suffixes)
    inference = inference_names(options)
    key = (input_name, "+".join([trained, *inference]), label, options.fold)
    earlier = read_results(results)
    if any(run_key(record) == key for record in earlier):
        logger.info("%s fold %d (%s, input %s) is already in %s: skipped", key[1], options.fold, label, input_name,
                    results)
        return 0
    complete_dir, complete_flags, complete_plan, complete_records = complete_run(options, input_name, label)
    iterations = options.stage_iterations or complete_plan["iterations"]
    epochs = math.ceil(iterations / complete_plan["iterations_per_epoch"])
    stage_dir = run_folder(options.out, input_name, trained, label, options.fold)
    stage_flags = ["--subsets_from", str(complete_dir / "last.pth"), "--root_path", str(fold_dir.resolve()),
                   "--device", options.device, *machine_flags(options), "--max_iterations", str(iterations),
                   "--max_epochs", str(epochs), "--save_every", str(epochs),
                   *(["--base_lr", f"{options.stage_base_lr:g}"] if options.stage_base_lr is not None else [])]
    # the stage scored on all three sequences, if recorded: the same training (its own seconds, not the total)
    recorded = [{"train_seconds": r["stage_train_seconds"]} for r in earlier
                if run_key(r) == (input_name, trained, label, options.fold)]
    stage_seconds = train_once(stage_flags, stage_dir, iterations, RUN_DEFAULTS["seed"], recorded[:1],
                               train_subset_stage)
    test_dir = stage_dir / "_".join(["test_last", *inference])
    inference_flags = ((["--tta"] if options.tta else []) + (["--postprocess"] if options.postprocess else [])
                       + ["--sequences", ",".join(options.sequences), "--missing", options.missing])
    if score_run(stage_dir, fold_dir.resolve(), test_dir, options.device, options.amp, inference_flags) != 0:
        raise BenchmarkError(f"test.py failed for {key[1]} fold {options.fold}")
    metrics = read_metrics(test_dir / "metrics.csv", dataset["split"]["test"])
    training = (options.variant, options.augmentation)
    complete_seconds = complete_records[0]["train_seconds"]
    records = run_records(options, key, [(stage_dir, training, RUN_DEFAULTS["seed"])],
                          {training: (complete_dir, complete_flags, complete_plan)}, complete_seconds + stage_seconds,
                          metrics)
    stage = {"complete_variant": complete_records[0]["variant"], "complete_train_seconds": complete_seconds,
             "stage_iterations": iterations, "stage_train_seconds": round(stage_seconds, 1)}
    append_results(results, [{**record, **stage} for record in records])
    logger.info("%s fold %d: %d cases; the stage's %d iterations in %.0f s of training on %s's %.0f s -> %s", key[1],
                options.fold, len(metrics), iterations, stage_seconds, stage["complete_variant"], complete_seconds,
                results)
    return 0
