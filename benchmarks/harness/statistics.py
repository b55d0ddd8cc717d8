"""Paired comparisons of two variants over the same cases: per-case differences, their bootstrap interval and the
Wilcoxon signed-rank test."""
import numpy as np
import scipy.stats


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
