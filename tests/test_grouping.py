"""Spectral clustering against planted blocks and scikit-learn; the bit allocation against
brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from channel_grouping import (allocate_bits, cluster_errors, group_channels, order_groups, spectral_clustering,
                              top_eigenvectors)


def planted(sizes: list[int], seed: int, inside: float, outside: float, noise: float):
    """A symmetric affinity with blocks of `sizes` channels in shuffled order: `inside` within a
    block, `outside` across, plus uniform noise in [0, noise). Returns (A, true labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    same = labels[:, None] == labels[None, :]
    A = torch.where(same, inside, outside) + noise * torch.rand(len(labels), len(labels), generator=g)
    A = (A + A.t()) / 2
    A.fill_diagonal_(0)
    return A, labels


def normalized(A: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 as spectral_clustering forms it."""
    M = A.clone()
    M.fill_diagonal_(0)
    M += 1e-6 * M.mean()
    d = M.sum(1).rsqrt()
    return d[:, None] * M * d[None, :]


def sklearn_labels(A: torch.Tensor, k: int) -> np.ndarray:
    return SpectralClustering(k, affinity="precomputed", random_state=0).fit_predict(A.numpy())


CASES = [  # sizes, (inside, outside, noise)
    ([20, 40, 60], (0.3, 0.1, 0.4)),
    ([50, 50, 50, 50, 50], (0.2, 0.1, 0.4)),
    ([30, 200, 80, 120], (0.25, 0.1, 0.4)),
    ([100, 200, 150, 180], (0.2, 0.1, 0.4)),      # 630 channels: subspace iteration
    ([200, 200, 200, 200, 200], (0.3, 0.1, 0.4)),  # 1000 channels
]


@pytest.mark.parametrize("sizes,params", CASES, ids=[str(sum(s)) + "ch" for s, _ in CASES])
def test_recovers_planted_blocks_and_agrees_with_sklearn(sizes, params):
    A, truth = planted(sizes, 0, *params)
    ours = spectral_clustering(A, len(sizes)).numpy()
    assert ours.shape == (sum(sizes),)
    assert set(ours.tolist()) <= set(range(len(sizes)))
    ref = sklearn_labels(A, len(sizes))
    assert adjusted_rand_score(truth.numpy(), ref) >= 0.9, "the instance itself is too hard"
    assert adjusted_rand_score(truth.numpy(), ours) >= 0.9
    assert adjusted_rand_score(ref, ours) >= 0.9


# weak signal: the leading eigenvalues of D^-1/2 A D^-1/2 are only ~0.02-0.05 above the bulk
WEAK = [([100, 200, 150, 180], (0.15, 0.1, 0.3)), ([120] * 5, (0.12, 0.1, 0.3)), ([700] * 3, (0.11, 0.1, 0.3))]


@pytest.mark.parametrize("sizes,params", WEAK, ids=[str(sum(s)) + "ch" for s, _ in WEAK])
def test_subspace_iteration_finds_the_top_eigenvectors(sizes, params):
    """Above 512 channels the eigenvectors come from subspace iteration: they must span the
    same space as the dense solver's, even where the eigenvalue gap is small."""
    A, truth = planted(sizes, 1, *params)
    k = len(sizes)
    assert A.shape[0] > 512
    M = normalized(A)
    dense = torch.linalg.eigh(M.double())[1][:, -k:].float()
    V = top_eigenvectors(M, k)
    cosines = torch.linalg.svdvals(dense.t() @ (V / V.norm(dim=0)))  # of the principal angles
    assert cosines.min() > 0.99
    # and the clustering built on them finds what the dense eigenvectors find
    Vd = dense / dense.norm(dim=1, keepdim=True)
    from channel_grouping import kmeans
    reference = kmeans(Vd, k).numpy()
    assert adjusted_rand_score(reference, spectral_clustering(A, k).numpy()) >= 0.9


def test_dense_path_matches_eigh_exactly_in_span():
    A, _ = planted([40, 60, 80], 2, 0.3, 0.1, 0.4)
    M = normalized(A)
    V = top_eigenvectors(M, 3)
    dense = torch.linalg.eigh(M.double())[1][:, -3:].float()
    assert torch.linalg.svdvals(dense.t() @ V).min() > 0.9999


def test_group_channels_partitions():
    C = 100
    mi, _ = planted([30, 30, 40], 3, 0.3, 0.1, 0.3)
    diag = torch.rand(C, generator=torch.Generator().manual_seed(0))
    for method in ("mi", "random", "contiguous", "hessian"):
        groups = group_channels(method, 3, mi=mi, diag=diag, columns=C)
        allc = torch.cat(groups)
        assert sorted(allc.tolist()) == list(range(C)), method
        assert len(groups) == 3, method
    ordered = order_groups(group_channels("hessian", 4, diag=diag), diag)
    means = [float(diag[g].mean()) for g in ordered]
    assert means == sorted(means, reverse=True)
    with pytest.raises(ValueError, match="unknown grouping"):
        group_channels("kmeans", 3, mi=mi)


# ---------------------------------------------------------------- bit allocation
def brute_force(err: np.ndarray, sizes: list[int], cands: list[int], target: float,
                tol_bits: float | None = None) -> float:
    """Least error among width choices averaging at most target (with tol_bits: in
    [target - tol_bits, target]; if there are none, among those with the largest average)."""
    total = sum(sizes)
    combos = [(sum(s * b for s, b in zip(sizes, c)), sum(err[g, cands.index(b)] for g, b in enumerate(c)))
              for c in itertools.product(cands, repeat=len(sizes))]
    feasible = [(spend, e) for spend, e in combos if spend <= target * total + 1e-9]
    low = 0 if tol_bits is None else (target - tol_bits) * total - 1e-6
    near = [e for spend, e in feasible if spend >= low]
    if near:
        return min(near)
    top = max(spend for spend, _ in feasible)
    return min(e for spend, e in feasible if spend == top)


def total_error(err, bits, cands):
    return sum(err[g, cands.index(b)] for g, b in enumerate(bits))


@pytest.mark.parametrize("tol_bits", [None, 0.01], ids=["free", "within_0.01"])
@pytest.mark.parametrize("monotone", [True, False], ids=["decreasing_errors", "arbitrary_errors"])
def test_allocate_bits_matches_brute_force(monotone, tol_bits):
    rng = np.random.default_rng(0)
    for trial in range(150):
        G = int(rng.integers(2, 6))
        cands = [2, 3, 4, 8] if trial % 2 else [2, 3, 4, 5, 6]
        sizes = [int(s) for s in rng.integers(1, 40, G)]
        err = rng.random((G, len(cands))) * rng.random((G, 1)) * 10
        if monotone:  # what real quantization errors look like: more bits, less error
            err = -np.sort(-err, axis=1)
        target = float(rng.uniform(min(cands), max(cands)))
        bits = allocate_bits(err, sizes, cands, target, tol_bits)
        assert len(bits) == G and all(b in cands for b in bits)
        assert sum(s * b for s, b in zip(sizes, bits)) <= target * sum(sizes) + 1e-9, "budget exceeded"
        assert total_error(err, bits, cands) == pytest.approx(brute_force(err, sizes, cands, target, tol_bits), rel=1e-9,
                                                              abs=1e-12), f"trial {trial}: not optimal"


def test_allocate_bits_fills_the_budget():
    """With decreasing errors and equal group sizes every multiple of 1/G is reachable, and
    the allocation lands exactly on the target."""
    rng = np.random.default_rng(1)
    cands = list(range(2, 9))
    for target in (2.0, 2.5, 3.0, 3.25, 4.75, 8.0):
        err = -np.sort(-rng.random((8, len(cands))), axis=1)
        bits = allocate_bits(err, [16] * 8, cands, target)
        assert np.mean(bits) == pytest.approx(target)


def test_more_sensitive_groups_get_at_least_as_many_bits():
    rng = np.random.default_rng(2)
    cands = list(range(2, 9))
    for _ in range(50):
        base = np.sort(rng.random(len(cands)))[::-1] * (0.5 ** np.arange(len(cands)))  # strictly decreasing
        scale = rng.uniform(0.1, 10, 6)
        err = scale[:, None] * base[None, :]
        bits = allocate_bits(err, [32] * 6, cands, float(rng.uniform(2.5, 6)))
        order = np.argsort(scale)
        assert all(bits[a] <= bits[b] for a, b in zip(order, order[1:])), (scale, bits)


def test_allocation_from_hessian_errors_prefers_important_channels():
    """Channels with 10x larger activations (Hessian diagonal x100) get more bits."""
    g = torch.Generator().manual_seed(0)
    C = 64
    X = torch.randn(1024, C, generator=g)
    X[:, :16] *= 10
    H = 2 * X.t() @ X / X.shape[0]
    W = torch.randn(32, C, generator=g)
    groups = group_channels("contiguous", 4, columns=C)
    cands = list(range(2, 9))
    err = cluster_errors(W, H, groups, cands)
    assert np.all(np.diff(err.numpy(), axis=1) < 0), "RTN error must fall with every extra bit"
    bits = allocate_bits(err, [16] * 4, cands, 3.0)
    assert bits[0] > max(bits[1:])
    assert sum(bits) == 12


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_cluster_errors_with_runs_equal_a_grid_per_run(sparsity):
    """cluster_errors with a groupsize: each group in descending H_jj order, cut into runs of
    groupsize columns (the rest last), a min-max grid per row and run, then tr(E H_gg E^T), as
    written out here; a groupsize no group exceeds changes nothing, bit for bit."""
    from quant import fit_grid, quantize
    g = torch.Generator().manual_seed(1)
    C = 70
    X = torch.randn(512, C, generator=g) * torch.rand(C, generator=g) * 3
    H = 2 * X.t() @ X / X.shape[0]
    W = torch.randn(12, C, generator=g)
    groups = [torch.arange(0, 45), torch.arange(45, 52), torch.arange(52, 70)]
    cands = [2, 3, 5]
    assert torch.equal(cluster_errors(W, H, groups, cands, sparsity, groupsize=45),
                       cluster_errors(W, H, groups, cands, sparsity))
    got = cluster_errors(W, H, groups, cands, sparsity, groupsize=16)
    dH = torch.diag(H)
    Wp = W.clone()
    if sparsity:
        k = round(sparsity * C)
        Wp.scatter_(1, torch.topk(W ** 2 * dH[None], k, dim=1, largest=False).indices, 0.0)
    for gi, grp in enumerate(groups):
        grp = grp[torch.argsort(dH[grp], descending=True)] if grp.numel() > 16 else grp
        for bi, b in enumerate(cands):
            E = torch.zeros(12, grp.numel())
            for c in range(0, grp.numel(), 16):
                Wr = Wp[:, grp[c:c + 16]]
                maxq = torch.full((12,), 2.0 ** b - 1)
                scale, zero = fit_grid(Wr, maxq)
                E[:, c:c + 16] = (Wr - quantize(Wr, scale[:, None], zero[:, None], maxq[:, None])) * (Wr != 0)
            want = float(((E @ H[grp][:, grp]) * E).sum())
            assert float(got[gi, bi]) == pytest.approx(want, rel=1e-5), (gi, b)
    assert (got[0] < cluster_errors(W, H, groups, cands, sparsity)[0]).all()  # more grids, less error


def test_allocate_bits_rejects_target_below_smallest_width():
    with pytest.raises(ValueError, match="below the smallest width"):
        allocate_bits(np.ones((2, 3)), [4, 4], [2, 3, 4], 1.5)
