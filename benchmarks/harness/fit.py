"""How much of what a run learnt carries over: one trained run scored on its fold's training cases and on its test
cases (<out>/fit.jsonl, <out>/fit.md)."""
import datetime
import logging
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness.prepare import read_input
from benchmarks.harness.records import (STRUCTURE_NAMES, BenchmarkError, append_results, defined, publish_report,
                                        read_json, read_results, run_key, table_row)
from benchmarks.harness.run import read_metrics, run_folder, score_run, trained_amp
from datasets.vocabulary import MODALITIES
from engine.runs import git_commit

logger = logging.getLogger("benchmark")


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
                  "fold": options.fold, "iterations": read_json(run_dir / "plan.json", "run plan")["schedule"][
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
                records += [{**common, "cases": cases, "case": case, "structure": structure, "dice": defined(dice),
                             "hd95": defined(hd95)}
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
        lines.append(table_row(variant, input_name, budget, group, [r["iterations"] for r in group], cells))
    return "\n".join(lines)


def fit_report(out):
    return publish_report(
        out, FIT_RESULTS, "fit", "Training against test cases",
        "Mean Dice (%) over the cases of all folds scored: on each run's own training cases, on its test cases, and "
        "the drop from the first to the second.", fit_table, "fit.md")
