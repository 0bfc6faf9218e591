"""Per-round labelling budgets: round(N * rho) per round, the last round topping up to round(N * rho * R)."""

from __future__ import annotations

import numbers


def budget_schedule(n_pool: int, num_rounds: int, ratio_per_round: float | None = None,
                    total_budget: int | None = None) -> list[int]:
    """Number of labels to query in each of `num_rounds` rounds.

    With `ratio_per_round` (official): n_r = round(N * rho) and the last round tops up to B = round(N * rho * R)
    (Python rounding). The release can give the last round a negative size when round(N * rho) * (R - 1) > B; here
    every round is clamped, n_r = min(round(N * rho), B - queried), so no entry is negative and the sum is B. With
    `total_budget` B: n_r = B // R and the last round takes the remainder.
    """
    if not isinstance(n_pool, int) or n_pool < 0:
        raise ValueError(f"n_pool must be a non-negative int, got {n_pool!r}.")
    if not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds must be a positive int, got {num_rounds!r}.")
    if total_budget is not None and (isinstance(total_budget, bool) or not isinstance(total_budget, numbers.Integral)
                                     or total_budget < 0):
        raise ValueError(f"total_budget must be a non-negative int, got {total_budget!r}.")
    if total_budget is None and ratio_per_round is not None and (
            isinstance(ratio_per_round, bool) or not isinstance(ratio_per_round, numbers.Real)
            or not 0 <= ratio_per_round <= 1):  # NaN fails the range test too
        raise ValueError(f"ratio_per_round must be a number in [0, 1], got {ratio_per_round!r}.")
    if total_budget is not None:
        total, per_round = int(total_budget), int(total_budget) // num_rounds
    elif ratio_per_round is not None:
        total, per_round = round(n_pool * ratio_per_round * num_rounds), round(n_pool * ratio_per_round)
    else:
        raise ValueError("budget_schedule needs ratio_per_round or total_budget.")
    if total > n_pool:
        raise ValueError(f"the labelling budget ({total} labels over {num_rounds} rounds) exceeds the pool size "
                         f"({n_pool}); lower ratio_per_round/total_budget or num_rounds.")
    schedule, queried = [], 0
    for r in range(num_rounds):
        n = total - queried if r == num_rounds - 1 else min(per_round, total - queried)
        schedule.append(n)
        queried += n
    return schedule
