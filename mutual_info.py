"""Mutual information between the input channels of a linear layer.

Two estimators, both returning a symmetric (C, C) matrix in nats with a zero diagonal:
- `gaussian_mi`: I = -1/2 log(1 - rho^2) from the channel covariance. Almost free: the
  solver's Hessian pass already has the second moments, only the means are added.
- `binned_mi`: equal-frequency (quantile) binning of a token subsample and the plug-in
  estimate with the Miller-Madow bias correction; all pairs at once as one-hot matrix
  products, so it runs on the GPU's matrix units.
"""
from __future__ import annotations

import torch

from quant import mm_fp32, row_pieces

MI_METHODS = ("gaussian", "binned")


def _correlation_squared(hessian: torch.Tensor, mean: torch.Tensor, eps: float) -> torch.Tensor:
    """rho^2 (C, C) from H = 2 E[x x^T] and the channel means, in place on one fp32 buffer (0
    for dead channels), capped at 1 - eps."""
    mu = mean.float()
    cov = hessian.float() / 2  # E[x x^T]
    step = row_pieces(cov.shape[0])
    for r0 in range(0, cov.shape[0], step):  # covariance; row pieces: no second C x C buffer
        cov[r0:r0 + step].sub_(torch.outer(mu[r0:r0 + step], mu))
    std = torch.diag(cov).clamp(min=0).sqrt()
    alive = std > 0
    inv = torch.where(alive, 1 / std.clamp(min=1e-30), torch.zeros_like(std))
    return cov.mul_(inv[:, None]).mul_(inv[None, :]).square_().clamp_(max=1 - eps)


def gaussian_mi(hessian: torch.Tensor, mean: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gaussian MI from H = 2 E[x x^T] (C, C) and the channel means (C,). Works in place on
    one fp32 C x C buffer (11008^2 floats is 0.5 GB)."""
    mi = _correlation_squared(hessian, mean, eps).neg_().log1p_().mul_(-0.5)  # -1/2 log(1 - rho^2)
    mi.fill_diagonal_(0)
    return mi


def abs_correlation(hessian: torch.Tensor, mean: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """|rho| between every channel pair (zero diagonal): the plain dependence measure the MI
    is compared with (--grouping corr, corr_hessian)."""
    r = _correlation_squared(hessian, mean, eps).sqrt_()
    r.fill_diagonal_(0)
    return r


def quantile_bins(X: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-frequency bin index in [0, bins) for every entry of X (n, C), per column."""
    n = X.shape[0]
    ranks = torch.argsort(torch.argsort(X.float(), dim=0), dim=0)  # ties broken by position
    return torch.div(ranks * bins, n, rounding_mode="floor")


def binned_mi(X: torch.Tensor, bins: int = 8, chunk: int = 256) -> torch.Tensor:
    """Plug-in MI of every channel pair of X (n, C) after equal-frequency binning."""
    n, C = X.shape
    B = bins
    idx = quantile_bins(X, B)  # (n, C)
    mm_dtype = torch.float16 if X.is_cuda else torch.float32  # 0/1 are exact in fp16
    O = torch.zeros(n, C * B, device=X.device, dtype=mm_dtype)  # one-hot, channel-major
    O.scatter_(1, idx + torch.arange(C, device=X.device)[None, :] * B, 1)
    pm = (O.float().sum(0) / n).reshape(C, B)  # marginals (C, B)
    mi = torch.empty(C, C, device=X.device, dtype=torch.float32)
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        lhs = O[:, c0 * B:c1 * B].t()
        J = mm_fp32(lhs, O)  # co-occurrence counts, exact
        P = (J / n).reshape(c1 - c0, B, C, B)  # joint p(a, b) of channel pair (i, j)
        denom = pm[c0:c1, :, None, None] * pm[None, None, :, :]  # p(a) p(b)
        term = torch.where(P > 0, P * torch.log(P / denom.clamp(min=1e-30)), torch.zeros_like(P))
        mi[c0:c1] = term.sum(dim=(1, 3))
    # Miller-Madow: the plug-in estimate is biased up by about (B-1)^2 / (2n)
    mi = (mi - (B - 1) ** 2 / (2 * n)).clamp(min=0)
    mi = (mi + mi.t()) / 2
    mi.fill_diagonal_(0)
    return mi


class TokenSample:
    """A fixed-size random subsample of input tokens (rows) for the non-parametric estimator."""

    def __init__(self, max_tokens: int, per_batch: int, seed: int = 0):
        self.max_tokens = max_tokens
        self.per_batch = per_batch
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        X = inp.reshape(-1, inp.shape[-1])  # (n, C)
        take = min(self.per_batch, X.shape[0], self.max_tokens - self.count)
        if take <= 0:
            return
        pick = torch.randperm(X.shape[0], generator=self.gen)[:take].to(X.device)
        self.rows.append(X[pick].clone())
        self.count += take

    def absorb(self, other: "TokenSample") -> None:
        """Add the tokens another sample (another device's share of the windows) drew."""
        self.rows += [r.to(self.rows[0].device if self.rows else r.device) for r in other.rows]
        self.count += other.count

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.rows, 0)


def estimate_mi(method: str, hessian: torch.Tensor, mean: torch.Tensor,
                sample: TokenSample | None = None, bins: int = 8) -> torch.Tensor:
    """Dispatch to an estimator by name: 'gaussian' or 'binned'."""
    if method == "gaussian":
        return gaussian_mi(hessian, mean)
    if method == "binned":
        if sample is None or sample.count == 0:
            raise ValueError("the binned MI estimator needs a token sample")
        return binned_mi(sample.tensor(), bins)
    raise ValueError(f"unknown MI estimator {method!r}; choose one of {', '.join(MI_METHODS)}")


def mi_summary(mi: torch.Tensor, rows: int | None = None) -> dict[str, float]:
    """Statistics of the off-diagonal MI values, for the log: their mean (summed in float64),
    maximum and the fraction above 0.1 nats. Worked out a piece of rows at a time, the diagonal
    masked per piece: gathering the off-diagonal values at once took four C x C buffers (the
    mask's int64 indices and the copy), the largest single cost of MI mode's GPU memory.
    rows: rows per piece (default: about a sixteenth)."""
    C = mi.shape[0]
    n = C * C - C
    if n == 0:
        return {"mean": 0.0, "max": 0.0, "frac_above_0.1": 0.0}
    total = torch.zeros((), dtype=torch.float64, device=mi.device)
    above = torch.zeros((), dtype=torch.int64, device=mi.device)
    top = torch.full((), -float("inf"), dtype=mi.dtype, device=mi.device)
    step = rows or row_pieces(C)
    for r0 in range(0, C, step):
        piece = mi[r0:r0 + step]
        diag = torch.zeros_like(piece, dtype=torch.bool)
        diag[:, r0:r0 + step].fill_diagonal_(True)
        total += piece.masked_fill(diag, 0).sum(dtype=torch.float64)
        above += ((piece > 0.1) & ~diag).sum()
        top = torch.maximum(top, piece.masked_fill(diag, -float("inf")).max())
    return {"mean": float(total) / n, "max": float(top), "frac_above_0.1": int(above) / n}
