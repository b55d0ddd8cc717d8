"""What each subset of the sequences delivers (issue 38): per subset, (a) one I-MMSeg trained with sequence dropout
(immseg_seqdrop, the others left out), (b) the same recipe without it, given the subset with the others zero-filled
(immseg, --missing zero_fill), and (c) TransUNet trained on that subset alone (early fusion of a pair or of all
three, a single-sequence TransUNet for one); per structure the mean Dice and HD95 and (a)'s paired differences."""
from pathlib import Path

import numpy as np

from benchmarks.harness.records import STRUCTURE_NAMES, BenchmarkError, publish, records_or_refuse
from benchmarks.harness.statistics import bootstrap_interval, paired_differences
from benchmarks.harness.variants import VARIANTS, with_amp
from datasets.vocabulary import MODALITIES

SUBSETS = [MODALITIES, ("bSSFP", "LGE"), ("bSSFP", "T2w"), ("LGE", "T2w"), ("bSSFP",), ("LGE",), ("T2w",)]


def subset_variants(subset, amp="none", dropout="immseg_seqdrop"):
    """The recorded names of (a) (the variant ``dropout``), (b) and (c) for one subset."""
    names = "_".join(subset)
    if tuple(subset) == MODALITIES:
        return with_amp(dropout, amp), with_amp("immseg", amp), with_amp("transunet_early", amp)
    alone = (f"transunet_early_{names.lower()}" if len(subset) == 2 else f"transunet_single_{names.lower()}")
    return (f"{with_amp(dropout, amp)}+seq_{names}", f"{with_amp('immseg', amp)}+seq_{names}_zerofill",
            with_amp(alone, amp))


def _mean(records, structure, metric, scale):
    values = [r[metric] * scale for r in records if r["structure"] == structure and r[metric] is not None]
    return f"{np.mean(values):.2f}" if values else "n/a"


def _difference(records, reference, structure):
    differences = paired_differences(records, reference, structure, "dice")
    if not differences:
        return "n/a"
    low, high = bootstrap_interval(differences)
    return f"{np.mean(differences) * 100:+.2f} ({low * 100:+.2f} to {high * 100:+.2f})"


def subset_table(records, setting, amp="none", dropout="immseg_seqdrop"):
    """Markdown: one row per subset and structure at budget ``setting``; a subset with any of (a), (b), (c) missing
    shows what is recorded."""
    at_budget = [r for r in records if r["setting"] == setting]
    if not at_budget:
        raise BenchmarkError(f"no records at the budget {setting!r}")
    header = ["sequences", "structure", "folds", "cases", "Dice (a) dropout", "Dice (b) zero-filled",
              "Dice (c) trained alone", "Δ (a) - (b) (95% interval)", "Δ (a) - (c) (95% interval)",
              "HD95 (a) / (b) / (c) mm"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for subset in SUBSETS:
        groups = [[r for r in at_budget if r["variant"] == name] for name in subset_variants(subset, amp, dropout)]
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


def subsets_report(out, setting, amp="none", path=None, dropout="immseg_seqdrop"):
    """The subset table of <out>/results.jsonl at ``setting`` with (a) the recorded variant ``dropout`` (trained with
    --sequence_dropout; one no longer defined is named as recorded), published to ``path`` (default
    <out>/subsets.md)."""
    results = Path(out) / "results.jsonl"
    records = records_or_refuse(results, f"run --variant {dropout} --sequences ...")
    names = {subset_variants(subset, amp, dropout)[0] for subset in SUBSETS}
    if not any(r["variant"] in names and r["setting"] == setting for r in records):
        raise BenchmarkError(f"{results} holds no records of {with_amp(dropout, amp)} at {setting!r}: run --variant "
                             f"{dropout} first (the variants trained with --sequence_dropout: "
                             + ", ".join(name for name, variant in VARIANTS.items()
                                         if "--sequence_dropout" in variant.flags) + ")")
    described = f"{VARIANTS[dropout].description} ({dropout})" if dropout in VARIANTS else dropout
    text = "\n".join([
        f"# What each subset of the sequences delivers ({results}, {setting})", "",
        "Mean Dice (%) and HD95 (mm) over the cases of the folds recorded, per subset of the sequences: (a) one "
        f"model, {described}, the other sequences left out; (b) I-MMSeg trained without sequence dropout, "
        "given the subset with the others zero-filled; (c) TransUNet trained on the subset alone (early fusion; one "
        "sequence: a single-sequence TransUNet). Δ: (a)'s mean per-case paired Dice difference in points, 95% "
        "percentile bootstrap interval over the cases (10000 resamples, seed 0).", "",
        subset_table(records, setting, amp, dropout), ""])
    publish(text, Path(path) if path else Path(out) / "subsets.md")
    return 0
