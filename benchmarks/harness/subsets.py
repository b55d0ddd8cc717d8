"""What each subset of the sequences delivers: per subset, three models side by side, per structure the mean Dice
and HD95 and the first's paired differences against the other two.

- a subset stage: (a) the stage (immseg_subsets) on the recipe's run, (b) paired sequence dropout (immseg_seqpair,
  recorded), (c) TransUNet trained on the subset alone (early fusion of a pair or of all three, a single-sequence
  TransUNet for one); each at the budget and precision it was measured at, from one or more results files;
- a dropout model, rebuilt from the records of a training mode since removed: (a) one I-MMSeg trained with sequence
  dropout (immseg_seqdrop, the others left out), (b) the same recipe without it, given the subset with the others
  zero-filled (immseg, --missing zero_fill), (c) TransUNet trained on that subset alone.
"""
from pathlib import Path

import numpy as np

from benchmarks.harness.records import (STRUCTURE_NAMES, BenchmarkError, publish, read_results, records_or_refuse,
                                        run_key)
from benchmarks.harness.statistics import bootstrap_interval, paired_differences
from benchmarks.harness.variants import VARIANTS, described, with_amp
from datasets.vocabulary import MODALITIES

SUBSETS = [MODALITIES, ("bSSFP", "LGE"), ("bSSFP", "T2w"), ("LGE", "T2w"), ("bSSFP",), ("LGE",), ("T2w",)]


def trained_alone(subset, amp="none"):
    """The recorded name of TransUNet trained on ``subset`` alone (early fusion; one sequence: single)."""
    if tuple(subset) == MODALITIES:
        return with_amp("transunet_early", amp)
    names = "_".join(subset).lower()
    return with_amp(f"transunet_early_{names}" if len(subset) == 2 else f"transunet_single_{names}", amp)


def left_out(variant, subset, amp="none"):
    """The recorded name of ``variant`` scored on ``subset`` with the others left out (all three: the variant)."""
    name = with_amp(variant, amp)
    return name if tuple(subset) == MODALITIES else f"{name}+seq_{'_'.join(subset)}"


def subset_variants(subset, amp="none", dropout="immseg_seqdrop"):
    """The recorded names of (a) (the variant ``dropout``), (b) and (c) for one subset."""
    zero_filled = (with_amp("immseg", amp) if tuple(subset) == MODALITIES
                   else f"{with_amp('immseg', amp)}+seq_{'_'.join(subset)}_zerofill")
    return left_out(dropout, subset, amp), zero_filled, trained_alone(subset, amp)


def stage_variants(subset, amp="none", stage="immseg_subsets", paired="immseg_seqpair", compared_amp=None):
    """The recorded names of (a) the subset stage ``stage``, (b) the paired dropout model and (c) for one subset;
    (b) and (c) trained under ``compared_amp`` (default ``amp``)."""
    compared_amp = compared_amp or amp
    return left_out(stage, subset, amp), left_out(paired, subset, compared_amp), trained_alone(subset, compared_amp)


def _mean(records, structure, metric, scale):
    values = [r[metric] * scale for r in records if r["structure"] == structure and r[metric] is not None]
    return f"{np.mean(values):.2f}" if values else "n/a"


def _difference(records, reference, structure):
    differences = paired_differences(records, reference, structure, "dice")
    if not differences:
        return "n/a"
    low, high = bootstrap_interval(differences)
    return f"{np.mean(differences) * 100:+.2f} ({low * 100:+.2f} to {high * 100:+.2f})"


def comparison_table(records, labels, settings, names_of):
    """Markdown: one row per subset and structure, three models side by side: ``labels`` their column names,
    ``settings`` the budget each was recorded at, ``names_of(subset)`` their recorded names. A subset with any of
    them missing shows what is recorded."""
    if not any(r["setting"] == settings[0] for r in records):
        raise BenchmarkError(f"no records at the budget {settings[0]!r}")
    header = ["sequences", "structure", "folds", "cases", *(f"Dice {label}" for label in labels),
              "Δ (a) - (b) (95% interval)", "Δ (a) - (c) (95% interval)", "HD95 (a) / (b) / (c) mm"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for subset in SUBSETS:
        groups = [[r for r in records if r["variant"] == name and r["setting"] == setting]
                  for name, setting in zip(names_of(subset), settings)]
        if not any(groups):
            continue
        folds = ",".join(str(f) for f in sorted({r["fold"] for group in groups for r in group}))
        cases = len({(r["fold"], r["case"]) for r in groups[0]})
        for structure, label in STRUCTURE_NAMES.items():
            dice = [_mean(group, structure, "dice", 100) for group in groups]
            hd95 = " / ".join(_mean(group, structure, "hd95", 1) for group in groups)
            lines.append("| " + " | ".join([",".join(subset), label, folds, str(cases), *dice,
                                            _difference(groups[0], groups[1], structure),
                                            _difference(groups[0], groups[2], structure), hd95]) + " |")
    return "\n".join(lines)


def subset_table(records, setting, amp="none", dropout="immseg_seqdrop"):
    """Issue 38's table at budget ``setting``: (a) the dropout model, (b) zero-filled, (c) trained alone."""
    return comparison_table(records, ("(a) dropout", "(b) zero-filled", "(c) trained alone"), (setting,) * 3,
                            lambda subset: subset_variants(subset, amp, dropout))


def stage_table(records, settings, amp="none", stage="immseg_subsets", paired="immseg_seqpair", compared_amp=None):
    """The subset stage's table: (a) the stage, (b) the paired dropout model, (c) trained alone, each at its budget
    (``settings``)."""
    return comparison_table(records, ("(a) subset stage", "(b) paired dropout", "(c) trained alone"), settings,
                            lambda subset: stage_variants(subset, amp, stage, paired, compared_amp))


def stage_training_time(records, setting, stage_name):
    """A sentence on the subset stage's own training beside its complete run's, per fold, from its records."""
    per_fold = {r["fold"]: r for r in records if r["variant"] == stage_name and r["setting"] == setting}
    if not per_fold:
        return "The subset stage has no record with all three sequences at this budget: its training time is unknown."
    folds = [per_fold[fold] for fold in sorted(per_fold)]
    ratio = np.mean([r["stage_train_seconds"] / r["complete_train_seconds"] for r in folds])
    return (f"Training time of the subset stage ({stage_name}): "
            + "; ".join(f"fold {r['fold']} {r['stage_iterations']} iterations in {r['stage_train_seconds']:.0f} s, on "
                        f"top of the complete run's {r['iterations']} in {r['complete_train_seconds']:.0f} s "
                        f"({r['complete_variant']})" for r in folds)
            + f"; the stage adds {ratio:.2f} times the complete run's training time on average.")


def read_all_results(out, compared):
    """The records of <out>/results.jsonl and of each results file in ``compared``; a run recorded in two of them
    is refused (its cases would count twice)."""
    records = records_or_refuse(Path(out) / "results.jsonl", "run --variant ... --sequences ...")
    for path in compared:
        if not Path(path).is_file():
            raise BenchmarkError(f"results file {path} does not exist")
        other = read_results(path)
        repeated = sorted({run_key(r) for r in other} & {run_key(r) for r in records})
        if repeated:
            raise BenchmarkError(f"{path} records runs that are already read: {repeated[:3]}")
        records += other
    return records


def subsets_report(out, setting, amp="none", path=None, dropout="immseg_seqdrop", stage=None, compared=(),
                   paired="immseg_seqpair", paired_setting=None, alone_setting=None, compared_amp=None):
    """The subset table of <out>/results.jsonl (and the results files ``compared``) published to ``path`` (default
    <out>/subsets.md): with ``stage`` the comparison of a subset stage (``compared_amp``: the --amp of (b) and (c),
    default ``amp``), else that of the recorded dropout variant ``dropout``."""
    results = Path(out) / "results.jsonl"
    records = read_all_results(out, compared)
    first = stage or dropout
    names = {left_out(first, subset, amp) for subset in SUBSETS}
    if not any(r["variant"] in names and r["setting"] == setting for r in records):
        if stage:
            stages = [name for name, variant in VARIANTS.items() if variant.stage_of]
            hint = f"run --variant {first} first (the subset stages: {', '.join(stages)})"
        else:
            recorded = sorted({r["variant"].split("+seq_")[0] for r in records
                               if "+seq_" in r["variant"] and not r["variant"].endswith("_zerofill")})
            hint = f"the records hold subsets of {', '.join(recorded) or 'no model'}"
        raise BenchmarkError(f"{results} holds no records of {with_amp(first, amp)} at {setting!r}: {hint}")
    if stage:
        settings = (setting, paired_setting or setting, alone_setting or setting)
        title = f"# A subset stage against paired dropout and training on the subset alone ({results}, {setting})"
        explanation = (
            f"Mean Dice (%) and HD95 (mm) over the cases of the folds recorded, per subset of the sequences: (a) "
            f"{described(first)}, at {settings[0]}, --amp {amp}; (b) {described(paired)}, the other sequences left "
            f"out, at {settings[1]}, --amp {compared_amp or amp}; (c) TransUNet trained on the subset alone (early "
            f"fusion; one sequence: a single-sequence TransUNet), at {settings[2]}, --amp {compared_amp or amp}. With "
            "all three sequences, (a) is the complete run itself. Δ: (a)'s mean per-case paired Dice difference in "
            "points, 95% percentile bootstrap interval over the cases (10000 resamples, seed 0). Records: "
            + ", ".join(str(p) for p in [results, *compared]) + ".")
        table = stage_table(records, settings, amp, stage, paired, compared_amp)
        note = stage_training_time(records, setting, with_amp(stage, amp))
    else:
        title = f"# What each subset of the sequences delivers ({results}, {setting})"
        explanation = (
            "Mean Dice (%) and HD95 (mm) over the cases of the folds recorded, per subset of the sequences: (a) one "
            f"model, {described(first)}, the other sequences left out; (b) I-MMSeg trained without sequence dropout, "
            "given the subset with the others zero-filled; (c) TransUNet trained on the subset alone (early fusion; "
            "one sequence: a single-sequence TransUNet). Δ: (a)'s mean per-case paired Dice difference in points, 95% "
            "percentile bootstrap interval over the cases (10000 resamples, seed 0).")
        table, note = subset_table(records, setting, amp, dropout), None
    publish("\n".join([title, "", explanation, "", table, ""] + ([note, ""] if note else [])),
            Path(path) if path else Path(out) / "subsets.md")
    return 0
