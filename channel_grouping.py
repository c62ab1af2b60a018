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

from quant import fit_grid, hessian_order, quantize, row_pieces, run_sizes

GROUPING_METHODS = ("mi", "mi_hessian", "corr", "corr_hessian", "hessian_sim", "random", "contiguous", "hessian")
AFFINITY_METHODS = ("mi", "mi_hessian", "corr", "corr_hessian", "hessian_sim")  # spectral clustering of an affinity


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


def spectral_embedding(A: torch.Tensor, k: int, seed: int = 0, inplace: bool = False) -> torch.Tensor:
    """The k leading eigenvectors (C, k), largest eigenvalue last, of D^-1/2 A D^-1/2 for a
    symmetric non-negative affinity A (C, C). inplace: A (fp32) may be overwritten, which saves
    a C x C buffer. The leading k' < k columns' tail V[:, -k':] serves a clustering into k'."""
    M = A if (inplace and A.dtype == torch.float32) else A.float().clone()  # -> D^-1/2 A D^-1/2
    M.fill_diagonal_(0)
    M.add_(1e-6 * M.mean().clamp(min=1e-12))  # connects isolated (dead) channels
    dinv = M.sum(1).rsqrt()
    M.mul_(dinv[:, None]).mul_(dinv[None, :])
    return top_eigenvectors(M, k, seed=seed)  # (C, k)


def cluster_embedding(V: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Labels (C,) in [0, k): k-means of the rows of the k leading eigenvectors, normalized."""
    V = V[:, -k:]
    V = V / V.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return kmeans(V, k, seed=seed)


def spectral_clustering(A: torch.Tensor, k: int, seed: int = 0, inplace: bool = False) -> torch.Tensor:
    """Cluster labels (C,) in [0, k) from a symmetric non-negative affinity A (C, C).
    inplace: A (fp32) may be overwritten, which saves a C x C buffer."""
    C = A.shape[0]
    if k >= C:
        return torch.arange(C, device=A.device)
    return cluster_embedding(spectral_embedding(A, k, seed, inplace), k, seed)


def affinity(method: str, mi: torch.Tensor | None, diag: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The affinity a spectral grouping clusters: the dependence matrix (MI, or |correlation|
    for the corr methods) as it is, weighted by similar Hessian diagonal (*_hessian), or the
    Hessian-diagonal similarity alone (hessian_sim)."""
    if method == "hessian_sim":
        C = diag.shape[0]
        return sensitivity_weighted(torch.ones(C, C, device=diag.device), diag, inplace=True)
    if method.endswith("_hessian"):
        return sensitivity_weighted(mi, diag, inplace)
    return mi


def groups_for_ks(method: str, ks: list[int], mi: torch.Tensor | None = None, diag: torch.Tensor | None = None,
                  seed: int = 0, columns: int | None = None, inplace: bool = False) -> dict[int, list[torch.Tensor]]:
    """group_channels for several numbers of groups at once: an affinity's eigenvectors are
    computed once, for the largest k, and each k clusters the leading k of them."""
    C = columns if columns is not None else (mi.shape[0] if mi is not None else diag.shape[0])
    ks = sorted({max(1, min(k, C)) for k in ks})
    if method not in AFFINITY_METHODS:
        return {k: group_channels(method, k, diag=diag, seed=seed, columns=C) for k in ks}
    out = {k: [torch.arange(C, device=diag.device)] for k in ks if k == 1}
    out.update({k: [g.to(diag.device) for g in torch.arange(C).split(1)] for k in ks if k == C})
    rest = [k for k in ks if 1 < k < C]
    if rest:
        V = spectral_embedding(affinity(method, mi, diag, inplace), max(rest), seed, inplace=True)
        for k in rest:
            out[k] = _labels_to_groups(cluster_embedding(V, k, seed), k)
    return out


def _labels_to_groups(labels: torch.Tensor, k: int) -> list[torch.Tensor]:
    groups = [torch.nonzero(labels == g).flatten() for g in range(k)]
    return [g for g in groups if g.numel() > 0]


def group_channels(method: str, k: int, mi: torch.Tensor | None = None, diag: torch.Tensor | None = None,
                   seed: int = 0, columns: int | None = None, inplace: bool = False) -> list[torch.Tensor]:
    """Partition range(C) into k groups; returns channel index tensors (empty ones dropped).
    mi: the dependence matrix of the spectral methods (MI, or |correlation| for corr*).
    inplace: that matrix may be overwritten by the clustering."""
    C = columns if columns is not None else (mi.shape[0] if mi is not None else diag.shape[0])
    dev = mi.device if mi is not None else (diag.device if diag is not None else "cpu")
    k = max(1, min(k, C))
    if method in ("mi", "corr"):
        labels = spectral_clustering(mi, k, seed, inplace=inplace)
    elif method in AFFINITY_METHODS:
        labels = spectral_clustering(affinity(method, mi, diag, inplace), k, seed, inplace=True)
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
    return _labels_to_groups(labels, k)


def sensitivity_weighted(mi: torch.Tensor, diag: torch.Tensor, inplace: bool = False,
                         chunk: int | None = None) -> torch.Tensor:
    """Affinity MI_ij * exp(-(l_i - l_j)^2 / (2 s^2)), l = log diag(H), s = std(l): channels are
    grouped when they are mutually informative AND about as sensitive, so that one bit width
    suits the whole group."""
    A = mi if (inplace and mi.dtype == torch.float32) else mi.float().clone()
    ld = torch.log(diag.float().clamp(min=1e-12))
    s2 = 2 * ld.var().clamp(min=1e-12)
    chunk = chunk or row_pieces(A.shape[0])
    for r0 in range(0, A.shape[0], chunk):  # row chunks: no second C x C buffer
        A[r0:r0 + chunk].mul_(torch.exp(-(ld[r0:r0 + chunk, None] - ld[None, :]) ** 2 / s2))
    return A


def order_groups(groups: list[torch.Tensor], diag: torch.Tensor) -> list[torch.Tensor]:
    """Groups by descending mean Hessian diagonal: the solver meets important channels first."""
    return sorted(groups, key=lambda g: -float(diag[g].mean()))


# ---------------------------------------------------------------- bit allocation
def cluster_errors(W: torch.Tensor, H: torch.Tensor, groups: list[torch.Tensor], candidates: list[int],
                   sparsity: float = 0.0, sym: bool = False, row_splits: list[int] | None = None,
                   on_device: bool = False, mse: bool = False, max_bytes: int = 2 ** 27,
                   groupsize: int = -1) -> torch.Tensor:
    """err[g, b] = tr(E H_gg E^T), E the round-to-nearest error of W[:, g] (per-row grid) at
    width candidates[b]. groupsize > 0: a group longer than that is cut into runs of groupsize
    columns in the solver's order (descending H_jj), each with its own grid, as the solver
    will cut it. With sparsity, the lowest w^2 H_jj of each row are pruned first, so
    only the kept weights count (the pruning error does not depend on the width).
    row_splits: W stacks several linears sharing H (rows per linear); then one err per
    linear comes back, (n, G, B), from a single pass. on_device: leave the result on W's device
    (nothing waits for the device) instead of moving it to the CPU. mse: the grids use the
    clipping search, as the solver's will.

    Rows are independent until the final sums, so W is worked through in pieces of at most
    max_bytes of fp32 rows: the temporaries (the pruned copy, the saliencies and their top-k,
    the (widths, rows, group columns) errors) stay bounded whatever the number of rows (the
    gate/up set of a 70B layer stacks 57344 rows; 7B's gate/up, 22016 rows, took 2.3 GB in
    one pass). The per-row errors are summed as one pass sums them: on the CPU the result is
    bitwise that of one pass; on a GPU the matrix library may pick another kernel for another
    number of rows, so the errors can differ in the last bits, as with rows split over GPUs."""
    R, C = W.shape
    splits = row_splits or [R]
    rows = max(1, max_bytes // (4 * C))
    dH = torch.diag(H)
    if groupsize > 0:  # the solver's order inside a group, where its runs are cut
        groups = [hessian_order(g, dH) if g.numel() > groupsize else g for g in groups]
    Hgs = [H[g][:, g] for g in groups]  # (s, s) each
    maxq = (2.0 ** torch.tensor(candidates, device=W.device, dtype=torch.float32))[:, None] - 1  # (B, 1)
    per_row = torch.empty(len(groups), len(candidates), R, dtype=torch.float64, device=W.device)
    k = int(round(sparsity * C)) if sparsity > 0 else 0
    for r0 in range(0, R, rows):
        Wc = W[r0:r0 + rows].float()
        if k > 0:
            idx = torch.topk(Wc ** 2 * dH[None, :], k, dim=1, largest=False).indices
            Wc = Wc.scatter(1, idx, 0.0)
            del idx
        for gi, (g, Hg) in enumerate(zip(groups, Hgs)):
            Wg = Wc[:, g]  # (r, s)
            kept = Wg != 0
            E = torch.empty(len(candidates), *Wg.shape, dtype=Wg.dtype, device=Wg.device)
            c = 0
            for n in run_sizes(Wg.shape[1], groupsize):
                Wr = Wg[:, c:c + n]
                scale, zero = fit_grid(Wr, maxq, sym, mse)  # every candidate width at once: (B, r) grids
                E[:, :, c:c + n] = Wr[None] - quantize(Wr[None], scale[:, :, None], zero[:, :, None], maxq[:, :, None])
                c += n
            E *= kept[None]
            per_row[gi, :, r0:r0 + rows] = ((E @ Hg) * E).sum(dim=2).double()  # (B, r)
    err = torch.zeros(len(splits), len(groups), len(candidates), dtype=torch.float64, device=W.device)
    for gi in range(len(groups)):
        for li, part in enumerate(torch.split(per_row[gi], splits, dim=1)):
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
    default leaves it free."""
    total = sum(sizes)
    costs = np.array([[s * b for b in candidates] for s in sizes], dtype=np.int64)
    low = None if tol_bits is None else max(0, int(np.ceil((target - tol_bits) * total - 1e-6)))
    picks = allocate(err, costs, int(np.floor(target * total + 1e-6)), low)
    if picks is None:
        raise ValueError(f"target {target} bits is below the smallest width {min(candidates)}")
    return [candidates[p] for p in picks]


def allocate(err: torch.Tensor | np.ndarray, costs: np.ndarray, budget: int, low: int | None = None
             ) -> list[int] | None:
    """The choice per group (an index into the candidates) minimising sum err[g, choice] with
    sum costs[g, choice] <= budget (integer costs, e.g. bits per output row); None where even
    the cheapest choices exceed the budget. With low, the spend must also be at least low
    (where no choice lands in [low, budget]: the largest spend under the budget).

    Exact (multiple-choice knapsack by dynamic programming over the exact spend); leftover
    budget then upgrades groups (to a costlier choice) where that does not raise the error.
    """
    err = np.asarray(err, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.int64)
    G, B = costs.shape
    if budget < 0:
        return None
    inf = np.inf
    dp = np.full(budget + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((G, budget + 1), dtype=np.int16)
    cand = np.empty((B, budget + 1))
    for g in range(G):  # cand[b, x]: best error of groups <= g spending x, group g at choice b
        cand.fill(inf)
        for bi in range(B):
            cost = int(costs[g, bi])
            if cost <= budget:
                cand[bi, cost:] = dp[: budget + 1 - cost] + err[g, bi]
        choice[g] = cand.argmin(0)  # ties: the cheaper (earlier) choice, as a strict < scan would pick
        dp = np.take_along_axis(cand, choice[g][None].astype(np.int64), 0)[0]
    if not np.isfinite(dp).any():
        return None
    # dp[x]: least error spending exactly x. By default the least error at any spend within the
    # budget (ties: the larger spend). With low, only spends of at least low count; where none
    # is reachable, the largest spend there is.
    window = dp[low or 0:]
    if np.isfinite(window).any():
        best = window.min()
        tol = 1e-9 * max(abs(best), 1e-30)
        used = (low or 0) + int(np.nonzero(window <= best + tol)[0].max())
    else:
        used = int(np.nonzero(np.isfinite(dp))[0].max())
    picks = [0] * G
    for g in range(G - 1, -1, -1):
        bi = int(choice[g, used])
        picks[g] = bi
        used -= int(costs[g, bi])
    # fill: upgrade one step where the budget allows, largest error gain per unit of cost first
    spent = sum(int(costs[g, picks[g]]) for g in range(G))
    improved = True
    while improved:
        improved = False
        opts = []
        for g in range(G):
            bi = picks[g]
            if bi + 1 < B:
                extra = int(costs[g, bi + 1] - costs[g, bi])
                if spent + extra <= budget and err[g, bi + 1] <= err[g, bi]:  # never a worse total
                    opts.append(((err[g, bi] - err[g, bi + 1]) / max(extra, 1), g, extra))
        if opts:
            _, g, extra = max(opts)
            picks[g] += 1
            spent += extra
            improved = True
    return picks


def allocate_stored(err: torch.Tensor | np.ndarray, sizes: list[int], candidates: list[int], target: float,
                    rows: int, pruned: list[int] | None = None, nm: tuple[int, int] = (0, 0),
                    groupsize: int = -1) -> tuple[list[int], float] | None:
    """Widths per group minimising sum err[g, width] such that everything the packed file holds
    for this linear (rows x sum(sizes) weights) averages at most `target` bits per weight:
    codes, fp16 scales and zero points per (row, run), the permutation, and the sparsity
    encoding (packing.py's layout). A group is one run, or with groupsize > 0 the runs
    run_sizes cuts it into. pruned[r]: weights pruned per row in run r (all groups' runs in
    order), exact where the solver prunes an exact count per row and block; with it, the codes
    of pruned weights are dropped behind a 1-bit mask when that is cheaper, as the packed file
    does. nm: N:M sparsity (its index is stored; kept codes per run are taken as their
    expected count). Returns (widths, summed error), or None where no choice fits."""
    import packing
    C = sum(sizes)
    total = int(np.floor(target * rows * C + 1e-6))
    runs = [run_sizes(s, groupsize) for s in sizes]
    n_runs = sum(len(r) for r in runs)
    layouts = []
    if nm[1]:
        layouts.append(("nm", [[round(n * (nm[1] - nm[0]) / nm[1]) for n in r] for r in runs]))
    else:
        layouts.append(("dense", runs))
        if pruned and any(pruned):
            left = iter(pruned)
            layouts.append(("bitmask", [[n - next(left) for n in r] for r in runs]))
    err = np.asarray(err, dtype=np.float64)
    best = None
    for mode, kept in layouts:
        budget = (total - packing.fixed_bits(rows, C, mode, nm, n_runs)) // rows  # bits per row
        costs = np.array([[sum(packing.run_row_bits(k, b) for k in ks) for b in candidates] for ks in kept],
                         dtype=np.int64)
        picks = allocate(err, costs, int(budget))
        if picks is None:
            continue
        e = float(sum(err[g, p] for g, p in enumerate(picks)))
        if best is None or e < best[1]:
            best = ([candidates[p] for p in picks], e)
    return best


def pruned_per_group(sizes: list[int], sparsity: float) -> list[int]:
    """Weights the solver prunes per row in each group when it prunes an exact share of every
    row per block (blocks never straddle a group): round(s * end) - round(s * start) over the
    permuted columns, as LinearSolver counts them."""
    out, c = [], 0
    for size in sizes:
        out.append(round(sparsity * (c + size)) - round(sparsity * c))
        c += size
    return out
