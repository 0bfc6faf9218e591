"""The quantisation core (spec qprompt.md §e, Q1-Q6): K-means codebook, error bounds, affine equivariance, STE, bit
packing and the CAC refit schedule, plus the uniform and noise baselines."""

from __future__ import annotations

import pytest
import torch

from peft_effadapt.quantization import (
    KL_PER_LEVEL,
    GaussianNoise,
    KMeansQuantizer,
    RefitSchedule,
    UniformQuantizer,
    assign_nearest,
    default_kl_threshold,
    kl_divergence,
    kmeans_1d,
    normalize,
    pack_indices,
    packed_length,
    payload_bytes,
    straight_through,
    unpack_indices,
)


# Q1 ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(200_000, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("k,centroids,tol,mse", [
    (2, [-0.798, 0.798], 0.01, 0.364),
    (4, [-1.51, -0.453, 0.453, 1.51], 0.02, 0.118),
    (16, None, None, 0.0095),
])
def test_q1_lloyd_max_values(gaussian, k, centroids, tol, mse):
    c = kmeans_1d(gaussian, k)
    assert torch.all(c[1:] >= c[:-1])
    if centroids is not None:
        torch.testing.assert_close(c, torch.tensor(centroids), rtol=0, atol=tol)
    err = ((gaussian - c[assign_nearest(gaussian, c)]) ** 2).mean().item()
    assert err == pytest.approx(mse, rel=0.03)


def test_assignment_is_argmin():
    z = torch.randn(1000)
    c = torch.sort(torch.randn(7)).values
    torch.testing.assert_close(assign_nearest(z, c), (z[:, None] - c[None]).abs().argmin(dim=1))


def test_empty_clusters_and_too_few_values():
    c = kmeans_1d(torch.tensor([0.0, 0.0, 1.0]), 8)
    assert torch.isfinite(c).all() and c.numel() == 8
    assert set(c[assign_nearest(torch.tensor([0.0, 1.0]), c)].tolist()) == {0.0, 1.0}


# Q2 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_q2_values_in_codebook_and_error_bound(bits):
    p = torch.randn(4, 512, generator=torch.Generator().manual_seed(bits)) * 0.02 + 0.01
    q = KMeansQuantizer(bits, codebook_dtype=torch.float32)(p)
    levels = torch.unique(q.values)
    assert levels.numel() <= 2**bits
    assert set(levels.tolist()) <= set(q.codebook.tolist())
    cb = torch.sort(q.codebook).values
    bound = max(float((cb[1:] - cb[:-1]).max()) / 2 if cb.numel() > 1 else 0.0,
                float(cb[0] - p.min()), float(p.max() - cb[-1]))
    assert float((q.values - p).abs().max()) <= bound + 1e-7


def test_q2_mse_non_increasing_in_bits():
    p = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    errors = [float(((KMeansQuantizer(b, codebook_dtype=torch.float32)(p).values - p) ** 2).mean())
              for b in range(1, 9)]
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:])), errors


def test_fp16_codebook_is_what_the_forward_uses():
    p = torch.randn(4, 512) * 0.02
    q = KMeansQuantizer(2)(p)
    assert q.codebook.dtype == torch.float16
    torch.testing.assert_close(q.values, q.codebook.float()[q.indices], rtol=0, atol=0)


# Q3 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,c", [(3.0, 0.5), (0.01, -2.0)])
def test_q3_affine_equivariance(a, c):
    p = torch.randn(2048, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    q = KMeansQuantizer(2, codebook_dtype=torch.float64)(p).values
    q_affine = KMeansQuantizer(2, codebook_dtype=torch.float64)(a * p + c).values
    torch.testing.assert_close(q_affine, a * q + c, rtol=0, atol=1e-6 * max(1.0, abs(a) + abs(c)))


# Q4 ------------------------------------------------------------------------------------------------------------
def test_q4_straight_through():
    p = torch.randn(4, 16, requires_grad=True)
    q = KMeansQuantizer(1)(p)
    used = straight_through(p, q.values)
    assert torch.equal(used.detach(), q.values)
    r = torch.randn(4, 16)
    (used * r).sum().backward()
    assert torch.equal(p.grad, r)


# Q5 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [13, 2048])
def test_q5_pack_roundtrip(bits, n):
    idx = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n + bits))
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_length(n, bits)
    assert torch.equal(unpack_indices(packed, bits, n), idx)


def test_q5_little_endian_layout():
    assert pack_indices(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    assert pack_indices(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_indices(torch.tensor([0xA, 0x3]), 4).tolist() == [0x3A]


def test_q5_payload_bytes():
    assert [payload_bytes(2048, b) for b in (1, 2, 4)] == [260, 520, 1056]


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True])
def test_bits_outside_range_are_rejected(bad):
    with pytest.raises(ValueError, match="bits"):
        KMeansQuantizer(bad)
    with pytest.raises(ValueError, match="bits"):
        pack_indices(torch.zeros(3, dtype=torch.long), bad)


def test_packed_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="bytes"):
        unpack_indices(torch.zeros(5, dtype=torch.uint8), 1, 2048)


# Q6 ------------------------------------------------------------------------------------------------------------
def test_q6_kl_zero_for_unchanged_weights():
    z = torch.randn(512)
    s = RefitSchedule(t_min=0)
    s.fitted(z, initial=True)
    c = kmeans_1d(z, 2)
    assert s.drift(z, c) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])) > 0


def test_q6_refit_schedule():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(1024, generator=g)
    quantizer = KMeansQuantizer(1, t_min=5, kl_threshold=0.02)
    for _ in range(12):  # unchanged weights: KL = 0, never refit
        quantizer(p, training=True)
    assert quantizer.refits == 0
    moved = p.clone()
    moved[:100] = 8.0  # a few far entries shift mu and sd: a fifth of the weights cross the cluster boundary
    quantizer = KMeansQuantizer(1, t_min=5, kl_threshold=0.02)
    quantizer(p, training=True)  # step 0: initial fit (not a refit)
    for _ in range(4):  # steps 1..4 < t_min: no refit however far the weights moved
        quantizer(moved, training=True)
        assert quantizer.refits == 0
    quantizer(moved, training=True)  # step 5: eligible, KL over threshold
    assert quantizer.refits == 1 and quantizer.schedule.last_fit == 5
    for _ in range(10):
        quantizer(moved, training=True)
    assert quantizer.refits == 1
    quantizer(p, training=False)  # eval never refits nor advances the step
    assert quantizer.schedule.step == 16


def test_refit_always_and_never():
    p = torch.randn(256)
    always, never = KMeansQuantizer(1, refit="always"), KMeansQuantizer(1, refit="never")
    for _ in range(3):
        always(p, training=True)
        never(p + torch.randn(256), training=True)
    assert always.refits == 2 and never.refits == 0  # the first call is the initial fit


# baselines -------------------------------------------------------------------------------------------------------
def test_uniform_quantizer_levels():
    p = torch.linspace(-1, 1, 101)
    q = UniformQuantizer(2, codebook_dtype=torch.float32)(p)
    torch.testing.assert_close(q.codebook, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert float((q.values - p).abs().max()) <= 1 / 3 + 1e-6


def test_noise_only_in_training():
    p = torch.zeros(1000)
    noise = GaussianNoise(0.1)
    assert torch.equal(noise(p, training=False).values, p)
    assert float(noise(p, training=True).values.std()) == pytest.approx(0.1, rel=0.15)


def test_default_kl_threshold_scales_with_the_histogram_bins():
    from peft_effadapt import QPromptConfig

    assert [default_kl_threshold(b) for b in (1, 2, 4)] == [KL_PER_LEVEL, 3 * KL_PER_LEVEL, 15 * KL_PER_LEVEL]
    assert KMeansQuantizer(2).kl_threshold == default_kl_threshold(2)
    assert KMeansQuantizer(2, kl_threshold=0.02).kl_threshold == 0.02
    assert QPromptConfig(bits=1).kl_threshold == default_kl_threshold(1)  # resolved, so the saved config says it
    assert QPromptConfig(bits=4, kl_threshold=0.02).kl_threshold == 0.02
    assert QPromptConfig(quantizer="noise").kl_threshold is None
    with pytest.raises(ValueError, match="kl_threshold must be a number >= 0"):
        QPromptConfig(bits=1, kl_threshold=-1.0)


def test_one_bit_codebook_refits_on_a_small_histogram_drift_at_the_default():
    """4 % of the weights cross the 1-bit boundary (KL ~ 1e-3): the default threshold refits at t_min, the former
    fixed 0.02 never would (1-bit histograms hardly move under z-scoring: spec b.6's rule then never fires)."""
    p = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    moved = p.clone()
    order = torch.argsort(p.abs())
    crossing = order[(p[order] > 0)][:164]  # the 164 smallest positive entries (4 %) cross to the negative side
    moved[crossing] = -moved[crossing]
    for threshold, expected in ((None, 1), (0.02, 0)):
        quantizer = KMeansQuantizer(1, t_min=5, kl_threshold=threshold)
        quantizer(p, training=True)
        drift = quantizer.schedule.drift(normalize(moved)[0], quantizer.codebook)
        assert default_kl_threshold(1) < drift < 0.02
        for _ in range(5):
            quantizer(moved, training=True)
        assert quantizer.refits == expected, threshold

