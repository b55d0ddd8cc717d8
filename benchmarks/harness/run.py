"""The benchmark's run: one variant (or an ensemble of its members) planned, trained, scored on the fold's test
cases in the original image space, and recorded in <out>/results.jsonl."""
import argparse
import csv
import datetime
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.harness.planning import plan_run, schedule_flags
from benchmarks.harness.prepare import read_input
from benchmarks.harness.records import (BenchmarkError, append_results, defined, machine_description, read_json,
                                        read_results, run_key, write_json)
from benchmarks.harness.variants import (RECIPE_FLAGS, VARIANTS, custom_lr, ensemble_name, flag_value,
                                         paper_schedule, recipe_flags, schedule_name, setting_label, training_name)
from datasets.dataset_myops import AUGMENTATIONS
from datasets.vocabulary import MODALITIES
from engine.evaluation import parse_evaluation_args, run_evaluation
from engine.options import RUN_DEFAULTS
from engine.runs import configure_logging, git_commit, run_folder_lock
from engine.training import parse_training_args
from trainer import train

logger = logging.getLogger("benchmark")


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
    return run_evaluation(parse_evaluation_args([
        "--output_dir", str(run_dir), "--root_path", str(root), "--checkpoint", "last", "--test_save_dir",
        str(save_dir), "--save_nii" if save_nii else "--no_save_nii", "--device", device, "--amp", amp, *extra_flags]))


def trained_amp(run_dir):
    """The precision a run trained in (its config.json), so that it is scored in the same."""
    return read_json(run_dir / "config.json", "run configuration")["args"].get("amp") or "none"


def train_once(flags, run_dir, iterations, seed, recorded, run_training=train):
    """``run_training`` (trainer.train, or a subset stage's) on train.py's ``flags`` in ``run_dir`` unless done
    (recorded in the results or its training.json); its training seconds."""
    if recorded:  # the same training, scored with other inference options: not trained again
        if not (run_dir / "last.pth").is_file():
            raise BenchmarkError(f"the results record the run {run_dir}, but it has no last.pth to score again")
        logger.info("%s is trained (its own run is in the results): not trained again", run_dir)
        return recorded[0]["train_seconds"]
    done = run_dir / "training.json"
    if done.is_file():
        logger.info("%s is trained (%s)", run_dir, done)
        return read_json(done, "training record")["train_seconds"]
    start = time.perf_counter()
    code = run_training(parse_training_args(flags + ["--seed", str(seed), "--output_dir", str(run_dir),
                                                     "--resume", "auto"]))
    train_seconds = time.perf_counter() - start
    configure_logging()
    if code != 0:
        raise BenchmarkError(f"train.py failed in {run_dir} (exit {code}); see {run_dir / 'log.txt'}")
    write_json(done, {"train_seconds": round(train_seconds, 1), "seed": seed, "iterations": iterations,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return train_seconds


def train_member(base_flags, plan, run_dir, seed, recorded):
    """Train one run to its plan unless done (train_once); training seconds."""
    schedule = plan["schedule"]
    return train_once(base_flags + schedule_flags(schedule) + ["--save_every", str(schedule["max_epochs"])], run_dir,
                      schedule["max_iterations"], seed, recorded)


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
        if tuple(options.sequences) != MODALITIES and options.missing == "leave_out" and not variant.serves_subsets:
            stages = ", ".join(other for other in VARIANTS if VARIANTS[other].serves_subsets)
            raise BenchmarkError(f"--sequences {','.join(options.sequences)}: {name} was not trained to leave a "
                                 f"sequence out (only the subset stages are: {stages}); score it with --missing "
                                 "zero_fill")
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


def plan_members(runs, options, member_options, trained_variants, fold_dir, crop_size, out):
    """{(variant, augmentation): (its first member's folder, train.py flags, plan)}: each training planned once (in
    its first member's folder, under that run's lock), its plan copied to the other members' folders."""
    plans = {}
    for run_dir, training, _ in runs:
        run_dir.mkdir(parents=True, exist_ok=True)
        if training not in plans:
            trained_variant, augmentation = training
            flags = recipe_flags(trained_variants[trained_variant], fold_dir, crop_size,
                                 argparse.Namespace(**{**vars(options), "augmentation": augmentation}), out)
            with run_folder_lock(run_dir):  # no timing beside a training of the same run
                plans[training] = run_dir, flags, plan_run(member_options, flags, run_dir)
            continue
        first, _, plan = plans[training]
        member_plan = run_dir / "plan.json"
        if not member_plan.exists():
            write_json(member_plan, plan)
        elif read_json(member_plan, "run plan") != plan:
            raise BenchmarkError(f"{member_plan} is not the plan of {first / 'plan.json'}: the members would train "
                                 f"differently; remove {run_dir} to start it over")
    return plans


def run_records(options, key, runs, plans, train_seconds, metrics):
    """The results records of a scored run: one per case and structure, each with the run's setting."""
    input_name, recorded_variant, label, _ = key
    member_plans = [plans[training][2] for _, training, _ in runs]
    member_configs = [flag_value(plans[training][1], "--vit_name") for _, training, _ in runs]
    base_flags, schedule = plans[runs[0][1]][1], member_plans[0]["schedule"]
    common = {"input": input_name, "variant": recorded_variant, "setting": label, "fold": options.fold,
              "inference": inference_names(options), "members": options.members,
              "mode": options.mode, "budget_minutes": options.budget_minutes,
              "iterations": sum(plan["schedule"]["max_iterations"] for plan in member_plans),
              "seconds_per_step": float(np.mean([plan["seconds_per_step"] for plan in member_plans])),
              "train_seconds": round(train_seconds, 1),
              **{name: schedule[name] for name in ("max_epochs", "start_contrast_epoch", "region_fusion_start_epoch")},
              "vit_name": ",".join(dict.fromkeys(member_configs)), "batch_size": options.batch_size,
              "augmentation": options.augmentation, "amp": options.amp,
              "base_lr": custom_lr(options) or RUN_DEFAULTS["base_lr"],
              "priors": flag_value(base_flags, "--prior_embeddings"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_commit(), "machine": machine_description(options.device)}
    if options.members > 1:
        common["member_runs"] = [{"variant": variant, "augmentation": augmentation, "seed": seed,
                                  "iterations": plan["schedule"]["max_iterations"], "vit_name": config}
                                 for (_, (variant, augmentation), seed), plan, config
                                 in zip(runs, member_plans, member_configs)]
    return [{**common, "case": case, "structure": structure, "dice": defined(dice), "hd95": defined(hd95)}
            for case, per_structure in sorted(metrics.items()) for structure, (dice, hd95) in per_structure.items()]


def inference_names(options):
    """The inference options recorded in the variant's name (tta, pp, heads_<names>, seq_<names>[_zerofill])."""
    names = [name for name, on in (("tta", options.tta), ("pp", options.postprocess)) if on]
    if options.heads != ("fused",):
        names.append("heads_" + "_".join(options.heads))
    if tuple(options.sequences) != MODALITIES:
        names.append("seq_" + "_".join(options.sequences) + ("_zerofill" if options.missing == "zero_fill" else ""))
    return names


def member_options_of(options):
    """The options of one member of ``options.members``: its share of the budget."""
    member_options = argparse.Namespace(**vars(options))
    if options.mode == "time":
        member_options.budget_minutes = options.budget_minutes / options.members
    else:
        member_options.iterations = options.iterations // options.members
    return member_options


def run(options):
    """Plan, train, test and record one variant on one fold; skipped if the results already hold it. With
    ``--members N``, N runs of the variant (seeds, augmentations or, with ``--member_variants``, variants differ)
    share the budget and are scored as an ensemble."""
    setting, fold_dir, dataset = read_input(options.data, options.fold)
    variants = member_variants(options)
    check_budget_flags(options, variants)
    label = setting_label(options.mode, options.budget_minutes, options.iterations)
    member_options = member_options_of(options)
    member_label = setting_label(options.mode, member_options.budget_minutes, member_options.iterations)
    input_name = Path(options.data).resolve().name
    out = Path(options.out)
    results = out / "results.jsonl"
    augmentations = member_augmentations(options)
    named = {variant: schedule_name(variant, options.fused_start_epoch, paper_schedule()[2], custom_lr(options),
                                    options.batch_size)
             for variant in variants}
    scored_variant = ensemble_name([named[variant] for variant in variants], augmentations, options.amp)
    inference = inference_names(options)
    recorded_variant = "+".join([scored_variant, *inference])
    key = (input_name, recorded_variant, label, options.fold)
    earlier = read_results(results)
    if any(run_key(record) == key for record in earlier):
        logger.info("%s fold %d (%s, input %s) is already in %s: skipped", recorded_variant, options.fold, label,
                    input_name, results)
        return 0
    options.dataset = setting["dataset"]
    runs = member_runs(out, input_name, [named[variant] for variant in variants], member_label, options.fold,
                       augmentations, options.amp)
    plans = plan_members(runs, options, member_options, {named[variant]: variant for variant in variants}, fold_dir,
                         dataset["settings"]["crop_size"], out)
    train_seconds = 0.0
    for run_dir, training, seed in runs:
        trained = training_name(*training, options.amp)
        standalone = [] if seed != RUN_DEFAULTS["seed"] else [
            r for r in earlier if run_key(r) == (input_name, trained, member_label, options.fold)]
        _, flags, plan = plans[training]
        train_seconds += train_member(flags, plan, run_dir, seed, standalone)
    test_dir = run_folder(out, input_name, scored_variant, label, options.fold) / "_".join(["test_last", *inference])
    inference_flags = ((["--tta"] if options.tta else []) + (["--postprocess"] if options.postprocess else [])
                       + ["--heads", ",".join(options.heads), "--sequences", ",".join(options.sequences),
                          "--missing", options.missing])
    ensemble_flags = ["--ensemble", *[str(run_dir) for run_dir, _, _ in runs[1:]]] if options.members > 1 else []
    code = score_run(runs[0][0], fold_dir.resolve(), test_dir, options.device, options.amp,
                     inference_flags + ensemble_flags)
    if code != 0:
        raise BenchmarkError(f"test.py failed for {recorded_variant} fold {options.fold} (exit {code})")
    metrics = read_metrics(test_dir / "metrics.csv", dataset["split"]["test"])
    records = run_records(options, key, runs, plans, train_seconds, metrics)
    append_results(results, records)
    logger.info("%s fold %d: %d cases, %d iterations in %.0f s of training (budget: %s) -> %s", recorded_variant,
                options.fold, len(metrics), records[0]["iterations"], train_seconds, label, results)
    return 0
