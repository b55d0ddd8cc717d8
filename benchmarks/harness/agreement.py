"""How far an ensemble's members agree: each member scored alone and the Dice between every two members'
predictions (<out>/agreement.jsonl, <out>/agreement.md)."""
import datetime
import itertools
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.harness.prepare import read_input
from benchmarks.harness.records import (STRUCTURE_NAMES, BenchmarkError, append_results, defined, publish_report,
                                        read_json, read_results, run_key, table_row)
from benchmarks.harness.run import read_metrics, run_folder, score_run, trained_amp
from engine.runs import git_commit
from utils import STRUCTURES

logger = logging.getLogger("benchmark")


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
    info = read_json(info_file, "ensemble scoring")
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
                "member_dice": [defined(scores[case][structure][0]) for scores in member_dice],
                "ensemble_dice": ensemble[case, structure],
                "agreement": pairwise_agreement(predictions[case], structure)}
               for case in sorted(cases) for structure in STRUCTURE_NAMES]
    append_results(results, records)
    logger.info("%s fold %d (%s): %d members on %d cases -> %s", options.variant, options.fold, options.setting,
                len(members), len(cases), results)
    return agreement_report(options.out)


def mean_defined(values):
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
            members = mean_defined([mean_defined(r["member_dice"]) for r in rows])
            together = mean_defined([r["ensemble_dice"] for r in rows])
            agreed = mean_defined([r["agreement"] for r in group if r["structure"] == structure])
            if members is None or together is None:
                cells.append("-")
                continue
            agreed_text = "-" if agreed is None else f"{agreed * 100:.2f}"
            cells.append(f"{members * 100:.2f} / {together * 100:.2f} ({(together - members) * 100:+.2f}); "
                         f"{agreed_text}")
        lines.append(table_row(variant, input_name, budget, group, [len(r["members"]) for r in group], cells))
    return "\n".join(lines)


def agreement_report(out):
    return publish_report(
        out, AGREEMENT_RESULTS, "agreement", "How far an ensemble's members agree",
        "Mean Dice (%) over the cases of all folds scored: of the members alone (their mean), of the ensemble, the "
        "ensemble's gain over its members, and the mean Dice between every two members' predictions (agreement; "
        "cases where both predictions of a pair are empty left out).", agreement_table, "agreement.md")
