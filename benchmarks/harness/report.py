"""The benchmark's tables: one row per variant, budget and structure over all cases of all folds, paired against a
reference (<out>/report.md); and two variants' per-case Dice ordered by the structure's volume."""
import math
import sys
from pathlib import Path

import numpy as np
import scipy.stats

from benchmarks.harness.records import STRUCTURE_NAMES, BenchmarkError, publish, read_results, records_or_refuse, span
from benchmarks.harness.statistics import dice_comparison_cells
from benchmarks.harness.variants import VARIANTS
from datasets.dataset_writer import DATASETS as PREPROCESSING_DATASETS
from datasets.layouts import load_case
from utils import STRUCTURES, summarise


def _mean_std(entry, key, scale):
    mean, std = entry[key], entry[f"{key}_std"]
    return "n/a" if mean is None else f"{mean * scale:.2f} ± {std * scale:.2f}"


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
        iterations = span([runs[f]["iterations"] for f in folds], "{:d}")
        seconds = span([runs[f]["seconds_per_step"] for f in folds], "{:.3f}")
        minutes = span([runs[f]["train_seconds"] / 60 for f in folds], "{:.1f}")
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
    finder, label_map, _ = PREPROCESSING_DATASETS[dataset]
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
