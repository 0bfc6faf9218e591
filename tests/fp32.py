"""The tolerance of the suite's exactness claims between two fp32 computations of one quantity that differ only in
operation order (another sequence length or attention kernel, a merged weight, a slimmed network, grouped vs dense
matmuls, another process's reduction order).

fp32 has eps = 1.19e-7. Summing K terms in another order changes the result by up to ~K * eps * sum|terms|; through
the few layers of our test models that stays far inside rtol = 1e-5 (~80 ulp) for every element of normal size.
Elements near zero in an output whose largest elements have magnitude M carry absolute errors of order eps * M (they
are differences of numbers of size M), hence atol = 1e-5 * M. A real defect (a wrong row, scale, sign or mask)
moves outputs by far more than 2e-5 of their scale, so the claims keep their teeth: `bitwise` checks (rtol = atol =
0) stay where both sides run the very same operations.
"""

from __future__ import annotations

import torch

RTOL = 1e-5


def fp32_atol(expected: torch.Tensor) -> float:
    """1e-5 of the largest magnitude in `expected` (1e-5 absolute for outputs of size <= 1)."""
    return RTOL * max(1.0, float(expected.detach().abs().max())) if expected.numel() else RTOL


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, msg=None) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=fp32_atol(expected), msg=msg)
