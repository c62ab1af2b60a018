"""Grouping of input channels and the bit allocation over the groups.

- `spectral_clustering`: normalized spectral clustering (Ng, Jordan & Weiss 2002) of an
  affinity matrix on its own device: top eigenvectors of D^-1/2 A D^-1/2 by block subspace
  iteration with a Rayleigh-Ritz step, rows normalized, then k-means++ / Lloyd with restarts.
  scikit-learn's SpectralClustering is the reference the tests compare against.
- `group_channels`: the grouping methods (MI clustering and the ablations: random,
  contiguous, by Hessian diagonal).
- `cluster_errors` + `allocate_bits`: per group and candidate width, the Hessian-weighted
  round-to-nearest error tr(E H_gg E^T); then the widths minimising the summed error under
  the average-bits budget (exact multiple-choice knapsack by dynamic programming).
"""
from __future__ import annotations

import numpy as np
import torch

from quant import fit_minmax, quantize

GROUPING_METHODS = ("mi", "mi_hessian", "random", "contiguous", "hessian")


# ---------------------------------------------------------------- spectral clustering
def top_eigenvectors(M: torch.Tensor, k: int, iters: int = 40, seed: int = 0) -> torch.Tensor:
    """The k eigenvectors of the largest eigenvalues of symmetric M (C, C) with spectrum in
    [-1, 1]; block subspace iteration on M - lambda_min I (positive semi-definite) with
    Rayleigh-Ritz."""
    C = M.shape[0]
    if C <= 512:  # small: the dense solver is exact and cheap
        vals, vecs = torch.linalg.eigh(M.double())
        return vecs[:, -k:].to(M.dtype)
    p = min(C, k + 10)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(C, p, generator=gen).to(M.device, M.dtype))
    # shift by -lambda_min (estimated by power iteration on I - M), not by +1: the spectrum of
    # M + I crowds near 1, where small eigenvalue gaps would need thousands of iterations
    v = Q[:, :1]
    for _ in range(20):
        v = torch.addmm(v, M, v, alpha=-1)  # (I - M) v; grows by at most 2x a step
    shift = -(v * (M @ v)).sum() / (v * v).sum()
    for it in range(iters):
        Q = torch.addmm(Q * shift, M, Q)  # (M + shift I) Q without forming it
        if it % 4 == 3 or it == iters - 1:  # re-orthonormalize now and then
            Q, _ = torch.linalg.qr(Q)
    T = Q.t() @ (M @ Q)  # (p, p) Rayleigh quotient
    vals, vecs = torch.linalg.eigh(T.double())
    return Q @ vecs[:, -k:].to(Q.dtype)


def kmeans(X: torch.Tensor, k: int, n_init: int = 4, iters: int = 40, seed: int = 0) -> torch.Tensor:
    """k-means++ seeding and Lloyd iterations on the rows of X (n, d); the n_init restarts run
    together as one batch on X's device, and the one of least inertia wins."""
    n, d = X.shape
    dev = X.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    I = n_init
    centers = X[torch.randint(n, (I,), generator=gen, device=dev)][:, None, :]  # (I, 1, d)
    for _ in range(1, k):  # k-means++: next center drawn proportional to squared distance
        d2 = torch.cdist(X[None].expand(I, n, d), centers).pow(2).min(2).values  # (I, n)
        d2 = d2 + 1e-12  # all-equal points: uniform draw
        pick = torch.multinomial(d2 / d2.sum(1, keepdim=True), 1, generator=gen)  # (I, 1)
        centers = torch.cat([centers, X[pick]], 1)
    offsets = (torch.arange(I, device=dev) * k)[:, None]
    for _ in range(iters):
        labels = torch.cdist(X[None].expand(I, n, d), centers).argmin(2)  # (I, n)
        flat = (labels + offsets).flatten()
        sums = torch.zeros(I * k, d, device=dev, dtype=X.dtype).index_add_(0, flat, X.repeat(I, 1))
        counts = torch.bincount(flat, minlength=I * k).to(X.dtype)[:, None]
        new = sums / counts.clamp(min=1)
        old = centers.reshape(I * k, d)
        centers = torch.where(counts > 0, new, old).reshape(I, k, d)  # empty cluster: keep its center
    dist = torch.cdist(X[None].expand(I, n, d), centers)
    labels = dist.argmin(2)
    inertia = dist.min(2).values.pow(2).sum(1)
    return labels[int(inertia.argmin())]


def spectral_clustering(A: torch.Tensor, k: int, seed: int = 0, inplace: bool = False) -> torch.Tensor:
    """Cluster labels (C,) in [0, k) from a symmetric non-negative affinity A (C, C).
    inplace: A (fp32) may be overwritten, which saves a C x C buffer."""
    C = A.shape[0]
    if k >= C:
        return torch.arange(C, device=A.device)
    M = A if (inplace and A.dtype == torch.float32) else A.float().clone()  # -> D^-1/2 A D^-1/2
    M.fill_diagonal_(0)
    M.add_(1e-6 * M.mean().clamp(min=1e-12))  # connects isolated (dead) channels
    dinv = M.sum(1).rsqrt()
    M.mul_(dinv[:, None]).mul_(dinv[None, :])
    V = top_eigenvectors(M, k, seed=seed)  # (C, k)
    del M
    V = V / V.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return kmeans(V, k, seed=seed)


def group_channels(method: str, k: int, mi: torch.Tensor | None = None, diag: torch.Tensor | None = None,
                   seed: int = 0, columns: int | None = None, inplace: bool = False) -> list[torch.Tensor]:
    """Partition range(C) into k groups; returns channel index tensors (empty ones dropped).
    inplace: the MI matrix may be overwritten by the clustering."""
    C = columns if columns is not None else (mi.shape[0] if mi is not None else diag.shape[0])
    dev = mi.device if mi is not None else (diag.device if diag is not None else "cpu")
    k = max(1, min(k, C))
    if method == "mi":
        labels = spectral_clustering(mi, k, seed, inplace=inplace)
    elif method == "mi_hessian":
        labels = spectral_clustering(sensitivity_weighted(mi, diag, inplace), k, seed, inplace=True)
    elif method == "random":
        gen = torch.Generator().manual_seed(seed)
        labels = (torch.randperm(C, generator=gen) % k).to(dev)
    elif method == "contiguous":
        labels = torch.arange(C, device=dev) * k // C
    elif method == "hessian":  # equal-size groups of channels ranked by diag(H)
        rank = torch.argsort(torch.argsort(diag, descending=True))
        labels = rank * k // C
    else:
        raise ValueError(f"unknown grouping {method!r}; choose one of {', '.join(GROUPING_METHODS)}")
    groups = [torch.nonzero(labels == g).flatten() for g in range(k)]
    return [g for g in groups if g.numel() > 0]


def sensitivity_weighted(mi: torch.Tensor, diag: torch.Tensor, inplace: bool = False,
                         chunk: int = 4096) -> torch.Tensor:
    """Affinity MI_ij * exp(-(l_i - l_j)^2 / (2 s^2)), l = log diag(H), s = std(l): channels are
    grouped when they are mutually informative AND about as sensitive, so that one bit width
    suits the whole group."""
    A = mi if (inplace and mi.dtype == torch.float32) else mi.float().clone()
    ld = torch.log(diag.float().clamp(min=1e-12))
    s2 = 2 * ld.var().clamp(min=1e-12)
    for r0 in range(0, A.shape[0], chunk):  # row chunks: no second C x C buffer
        A[r0:r0 + chunk].mul_(torch.exp(-(ld[r0:r0 + chunk, None] - ld[None, :]) ** 2 / s2))
    return A


def order_groups(groups: list[torch.Tensor], diag: torch.Tensor) -> list[torch.Tensor]:
    """Groups by descending mean Hessian diagonal: the solver meets important channels first."""
    return sorted(groups, key=lambda g: -float(diag[g].mean()))


# ---------------------------------------------------------------- bit allocation
def cluster_errors(W: torch.Tensor, H: torch.Tensor, groups: list[torch.Tensor], candidates: list[int],
                   sparsity: float = 0.0, sym: bool = False, row_splits: list[int] | None = None,
                   on_device: bool = False) -> torch.Tensor:
    """err[g, b] = tr(E H_gg E^T), E the round-to-nearest error of W[:, g] (per-row grid) at
    width candidates[b]. With sparsity, the lowest w^2 H_jj of each row are pruned first, so
    only the kept weights count (the pruning error does not depend on the width).
    row_splits: W stacks several linears sharing H (rows per linear); then one err per
    linear comes back, (n, G, B), from a single pass. on_device: leave the result on W's device
    (nothing waits for the device) instead of moving it to the CPU."""
    W = W.float()
    splits = row_splits or [W.shape[0]]
    if sparsity > 0:
        sal = W ** 2 * torch.diag(H)[None, :]
        k = int(round(sparsity * W.shape[1]))
        if k > 0:
            idx = torch.topk(sal, k, dim=1, largest=False).indices
            W = W.scatter(1, idx, 0.0)
    err = torch.zeros(len(splits), len(groups), len(candidates), dtype=torch.float64, device=W.device)
    maxq = (2.0 ** torch.tensor(candidates, device=W.device, dtype=torch.float32))[:, None] - 1  # (B, 1)
    for gi, g in enumerate(groups):
        Wg = W[:, g]  # (R, s)
        Hg = H[g][:, g]  # (s, s)
        kept = Wg != 0
        scale, zero = fit_minmax(Wg, maxq, sym)  # every candidate width at once: (B, R) grids
        Q = quantize(Wg[None], scale[:, :, None], zero[:, :, None], maxq[:, :, None])
        E = (Wg[None] - Q) * kept[None]
        per_row = ((E @ Hg) * E).sum(dim=2).double()  # (B, R)
        for li, part in enumerate(torch.split(per_row, splits, dim=1)):
            err[li, gi] = part.sum(1)
    if not on_device:
        err = err.cpu()
    return err if row_splits else err[0]


def allocate_bits(err: torch.Tensor | np.ndarray, sizes: list[int], candidates: list[int],
                  target: float, tol_bits: float | None = None) -> list[int]:
    """Widths per group minimising sum err[g, width] with the average width (weighted by sizes)
    at most `target`. With tol_bits, the average must also lie in [target - tol_bits, target]
    (where integer widths cannot land there: the largest average under the target they reach).
    Measured on SmolLM2, forcing the average up that way costs more error than it saves, so the
    default leaves it free.

    Exact (multiple-choice knapsack by dynamic programming over the exact spend); leftover
    budget then upgrades groups where that does not raise the error.
    """
    err = np.asarray(err, dtype=np.float64)
    G = len(sizes)
    total = sum(sizes)
    budget = int(np.floor(target * total + 1e-6))
    inf = np.inf
    dp = np.full(budget + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((G, budget + 1), dtype=np.int16)
    cand = np.empty((len(candidates), budget + 1))
    for g in range(G):  # cand[b, x]: best error of groups <= g spending x, group g at width b
        cand.fill(inf)
        for bi, b in enumerate(candidates):
            cost = sizes[g] * b
            if cost <= budget:
                cand[bi, cost:] = dp[: budget + 1 - cost] + err[g, bi]
        choice[g] = cand.argmin(0)  # ties: the narrower width, as a strict < scan would pick
        dp = np.take_along_axis(cand, choice[g][None].astype(np.int64), 0)[0]
    if not np.isfinite(dp).any():
        raise ValueError(f"target {target} bits is below the smallest width {min(candidates)}")
    # dp[x]: least error spending exactly x. By default the least error at any spend within the
    # budget (ties: the larger spend). With tol_bits, only spends within tol_bits under the target
    # count; where integer widths reach none of those, the largest spend there is.
    low = 0 if tol_bits is None else max(0, int(np.ceil((target - tol_bits) * total - 1e-6)))
    window = dp[low:]
    if np.isfinite(window).any():
        best = window.min()
        tol = 1e-9 * max(abs(best), 1e-30)
        used = low + int(np.nonzero(window <= best + tol)[0].max())
    else:
        used = int(np.nonzero(np.isfinite(dp))[0].max())
    picks = [0] * G
    for g in range(G - 1, -1, -1):
        bi = int(choice[g, used])
        picks[g] = bi
        used -= sizes[g] * candidates[bi]
    bits = [candidates[p] for p in picks]
    # fill: upgrade one step where the budget allows, largest error gain per bit first
    spent = sum(s * b for s, b in zip(sizes, bits))
    improved = True
    while improved:
        improved = False
        opts = []
        for g in range(G):
            bi = candidates.index(bits[g])
            if bi + 1 < len(candidates):
                extra = sizes[g] * (candidates[bi + 1] - bits[g])
                if spent + extra <= budget and err[g, bi + 1] <= err[g, bi]:  # never a worse total
                    opts.append(((err[g, bi] - err[g, bi + 1]) / extra, g, extra))
        if opts:
            _, g, extra = max(opts)
            bits[g] = candidates[candidates.index(bits[g]) + 1]
            spent += extra
            improved = True
    return bits
