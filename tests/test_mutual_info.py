"""MI estimators against the closed form of a bivariate Gaussian, and their basic shape."""
from __future__ import annotations

import math

import pytest
import torch

from mutual_info import TokenSample, binned_mi, estimate_mi, gaussian_mi, mi_summary
from sparsegpt_mi import LinearSolver

N = 20000


def gaussian_pair(rho: float, n: int = N, seed: int = 0, mean: float = 0.0) -> torch.Tensor:
    """(n, 2) samples of a standard bivariate Gaussian with correlation rho (shifted by mean)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, 2, generator=g)
    x = Z[:, 0]
    y = rho * x + math.sqrt(1 - rho ** 2) * Z[:, 1]
    return torch.stack([x, y], 1) + mean


def moments(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = 2 E[x x^T] and the channel means, as the solver accumulates them."""
    s = LinearSolver(X.shape[1], torch.device("cpu"))
    for chunk in X.split(4096):
        s.add_batch(chunk)
    return s.hessian(), s.mean()


def closed_form(rho: float) -> float:
    return -0.5 * math.log(1 - rho ** 2)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6, 0.9, -0.8])
@pytest.mark.parametrize("mean", [0.0, 5.0])
def test_gaussian_mi_matches_closed_form(rho, mean):
    X = gaussian_pair(rho, mean=mean)
    mi = gaussian_mi(*moments(X))
    # sampling error of rho at n = 20000 is ~ (1 - rho^2) / sqrt(n): a few 1e-3 nats at most
    assert float(mi[0, 1]) == pytest.approx(closed_form(rho), abs=0.01)


@pytest.mark.parametrize("rho", [0.3, 0.6])
@pytest.mark.parametrize("bins", [8, 12, 16])
def test_binned_mi_matches_closed_form(rho, bins):
    mi = binned_mi(gaussian_pair(rho), bins)
    assert float(mi[0, 1]) == pytest.approx(closed_form(rho), abs=0.05)


def test_binned_mi_strong_dependence_lower_bound_and_more_bins_closer():
    """Binning discards information (data processing), so at rho = 0.9 the estimate sits
    below the true 0.83 nats, and finer bins come closer."""
    true = closed_form(0.9)
    est = [float(binned_mi(gaussian_pair(0.9), b)[0, 1]) for b in (4, 8, 16)]
    assert all(e < true + 0.01 for e in est)
    assert est[0] < est[1] < est[2]
    assert est[2] == pytest.approx(true, abs=0.08)
    assert est[2] > 0.6


def test_independent_channels_near_zero():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 6, generator=g) * torch.tensor([1.0, 3.0, 0.1, 10.0, 1.0, 2.0]) + 4.0
    gm = gaussian_mi(*moments(X))
    bm = binned_mi(X, 8)
    off = ~torch.eye(6, dtype=torch.bool)
    assert gm[off].max() < 0.002  # ~ rho^2 / 2 with rho ~ 1/sqrt(n)
    assert bm[off].max() < 0.005  # Miller-Madow removes the (B-1)^2 / 2n bias


def test_nonlinear_dependence_seen_by_binned_only():
    """y = x^2 is uncorrelated with x: the Gaussian estimate is ~0, binning sees it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, generator=g)
    X = torch.stack([x, x ** 2 + 0.05 * torch.randn(N, generator=g)], 1)
    assert float(gaussian_mi(*moments(X))[0, 1]) < 0.01
    assert float(binned_mi(X, 16)[0, 1]) > 0.5


def test_strong_dependence_high():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, generator=g)
    X = torch.stack([x, 2 * x + 0.01 * torch.randn(N, generator=g), torch.randn(N, generator=g)], 1)
    gm = gaussian_mi(*moments(X))
    bm = binned_mi(X, 16)
    assert gm[0, 1] > 4.0  # -1/2 log(1 - rho^2) with 1 - rho^2 ~ 2.5e-5: ~5.3 nats
    assert bm[0, 1] > 1.5  # binned caps at log(bins) = 2.77
    assert bm[0, 1] > 10 * bm[0, 2] and gm[0, 1] > 100 * gm[0, 2]


@pytest.mark.parametrize("estimator", ["gaussian", "binned"])
def test_symmetric_zero_diagonal_nonnegative(estimator):
    g = torch.Generator().manual_seed(4)
    C = 12
    Z = torch.randn(5000, 4, generator=g)
    X = Z @ torch.randn(4, C, generator=g) + 0.5 * torch.randn(5000, C, generator=g)
    X[:, 7] = 0  # a dead channel
    H, mean = moments(X)
    sample = TokenSample(max_tokens=4096, per_batch=4096)
    sample.add_batch(X)
    mi = estimate_mi(estimator, H, mean, sample, bins=8)
    assert mi.shape == (C, C)
    assert torch.isfinite(mi).all()
    assert torch.allclose(mi, mi.t(), rtol=1e-5, atol=1e-7)  # up to float rounding order
    assert torch.all(torch.diag(mi) == 0)
    assert mi.min() >= 0
    if estimator == "gaussian":
        assert torch.all(mi[7] == 0)  # a constant channel carries no information
    off = ~torch.eye(C, dtype=torch.bool)
    assert mi[off].mean() > 0.05  # the channels share a rank-4 signal
    stats = mi_summary(mi)
    assert stats["max"] == pytest.approx(float(mi.max()))


def test_gaussian_mi_leaves_hessian_untouched():
    X = gaussian_pair(0.5)
    H, mean = moments(X)
    before = H.clone()
    gaussian_mi(H, mean)
    assert torch.equal(H, before)  # the solver still needs it


def test_estimate_mi_errors():
    H, mean = moments(gaussian_pair(0.5))
    with pytest.raises(ValueError, match="token sample"):
        estimate_mi("binned", H, mean, None)
    with pytest.raises(ValueError, match="unknown MI estimator"):
        estimate_mi("kraskov", H, mean)


def test_mi_summary_in_pieces_matches_the_gathered_values():
    """mi_summary works on pieces of rows with the diagonal masked, without gathering the
    off-diagonal values: the same maximum and fraction, the mean up to float rounding."""
    g = torch.Generator().manual_seed(0)
    mi = torch.rand(37, 37, generator=g) * 0.3
    mi = (mi + mi.t()) / 2
    mi.fill_diagonal_(5.0)  # the diagonal must not count
    off = mi[~torch.eye(37, dtype=torch.bool)]
    for rows in (1, 5, None, 1024):
        stats = mi_summary(mi, rows)
        assert stats["max"] == float(off.max())
        assert stats["frac_above_0.1"] == int((off > 0.1).sum()) / off.numel()
        assert stats["mean"] == pytest.approx(float(off.double().mean()), rel=1e-12)
