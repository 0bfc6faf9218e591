"""Paired comparison of two arms over seeds: mean difference, 95 % CI (Student t) and a verdict."""

from __future__ import annotations

import math
import statistics

# two-sided 95 % quantiles of Student's t, df = 1..30 (beyond: 1.96 is within 0.05 of the truth)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
MIN_SEEDS = 5


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def paired(arm: dict[int, float], baseline: dict[int, float], min_seeds: int = MIN_SEEDS) -> dict:
    """`arm` and `baseline` map seed -> metric. Uses the seeds both have. Verdict: 'supported' when the whole CI is
    above 0 (the arm is better, as the papers claim), 'contradicted' when it is below 0, 'inconclusive' when it
    straddles 0, 'pending' with fewer than `min_seeds` paired seeds."""
    seeds = sorted(set(arm) & set(baseline))
    diffs = [arm[s] - baseline[s] for s in seeds]
    out = {"seeds": seeds, "n": len(seeds), "differences": diffs,
           "arm_mean": statistics.fmean(arm[s] for s in seeds) if seeds else None,
           "baseline_mean": statistics.fmean(baseline[s] for s in seeds) if seeds else None}
    if len(seeds) < 2:
        return {**out, "mean_difference": diffs[0] if diffs else None, "ci95": None, "verdict": "pending"}
    mean = statistics.fmean(diffs)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    ci = [mean - half, mean + half]
    if len(seeds) < min_seeds:
        verdict = "pending"
    elif ci[0] > 0:
        verdict = "supported"
    elif ci[1] < 0:
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    return {**out, "mean_difference": mean, "ci95": ci, "verdict": verdict}


def paired_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level `alpha` with `n` pairs, for a true mean difference `effect`
    whose per-pair differences have standard deviation `sd` (noncentral t, exact)."""
    from scipy import stats

    if n < 2:
        raise ValueError(f"a paired t-test needs n >= 2 pairs, got {n}")
    if sd <= 0:
        return 1.0 if effect != 0 else alpha
    df, ncp = n - 1, effect / sd * math.sqrt(n)
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, ncp) + stats.nct.cdf(-critical, df, ncp))


def seeds_needed(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, max_n: int = 100_000) -> int:
    """Smallest number of paired seeds for which the paired t-test detects `effect` with `power` at spread `sd`."""
    if effect == 0:
        raise ValueError("a zero effect cannot be detected with any number of seeds")
    low, high = 2, 2
    while paired_power(high, effect, sd, alpha) < power:  # doubling, then bisection (power rises with n)
        low, high = high, high * 2
        if high > max_n:
            raise ValueError(f"effect {effect} at sd {sd} needs more than {max_n} seeds")
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if paired_power(mid, effect, sd, alpha) < power else (low, mid)
    return low


def detectable_effect(n: int, sd: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true difference that `n` paired seeds detect with `power` at spread `sd` (two-sided)."""
    if sd <= 0:
        return 0.0
    low, high = 0.0, sd
    while paired_power(n, high, sd, alpha) < power:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if paired_power(n, mid, sd, alpha) < power else (low, mid)
    return high
