"""The joint prune + quantize solver on small synthetic linears: exact sparsity, the N:M
pattern, values on the stated grid, the bit budget, and loss below the simple baselines."""
from __future__ import annotations

import warnings

import pytest
import torch

from channel_grouping import allocate_bits, cluster_errors, group_channels
from config import CompressConfig
from quant import magnitude_prune, rtn_quantize
from sparsegpt_mi import LinearSolver

CPU = torch.device("cpu")


def calibration(n: int = 512, C: int = 64, rank: int = 16, seed: int = 0, draw: int = 0) -> torch.Tensor:
    """Correlated inputs (n, C): a low-rank signal plus noise, channels of unequal scale.
    `seed` fixes the distribution, `draw` the sample (another draw = held-out data)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(rank, C, generator=g)
    col_scale = torch.linspace(0.3, 3.0, C)[torch.randperm(C, generator=g)]
    h = torch.Generator().manual_seed(1000 + draw)
    X = torch.randn(n, rank, generator=h) @ P + 0.3 * torch.randn(n, C, generator=h)
    return X * col_scale


def weights(R: int = 24, C: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(R, C, generator=torch.Generator().manual_seed(seed))


def solver_for(X: torch.Tensor) -> LinearSolver:
    """A fresh solver fed X in batches (a solver solves once: the solve owns its Hessian)."""
    s = LinearSolver(X.shape[1], CPU)
    for chunk in X.split(128):  # several batches, as the driver feeds them
        s.add_batch(chunk[None])
    return s


def out_err(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return float(torch.linalg.norm(X @ W.t() - X @ Q.t()))


def check_grid(res, bits_of_group: list[int], groups: list[torch.Tensor], one_grid_per_group: bool = True) -> None:
    """The returned perm/runs/scale/zero reproduce the weights exactly, each run holds
    integers q in [0, 2^bits - 1], and each (row, run) -- each (row, group) where a group
    has one grid -- has at most 2^bits distinct values (0 included: it is on the grid)."""
    W = res.weight
    R, C = W.shape
    assert sorted(res.perm.tolist()) == list(range(C))
    assert res.runs[0][0] == 0 and res.runs[-1][1] == C
    assert all(a[1] == b[0] for a, b in zip(res.runs, res.runs[1:])), "runs must tile the columns"
    assert res.scale.shape == res.zero.shape == (R, len(res.runs))
    group_of = torch.empty(C, dtype=torch.long)
    for gi, g in enumerate(groups):
        group_of[g] = gi
    for r, (s, e, b) in enumerate(res.runs):
        cols = res.perm[s:e]
        assert len(set(group_of[cols].tolist())) == 1, "a run lies inside one group"
        assert b == bits_of_group[int(group_of[cols[0]])]
        if b >= 16:
            continue
        w = W[:, cols]
        scale, zero = res.scale[:, r:r + 1], res.zero[:, r:r + 1]
        assert torch.all(scale > 0)
        assert torch.equal(zero, torch.round(zero))
        q = torch.round(w / scale) + zero
        assert q.min() >= 0 and q.max() <= 2 ** b - 1
        assert torch.equal(scale * (q - zero), w), f"run {r} ({b} bits): weights off the returned grid"
        for row in w:
            assert torch.unique(row).numel() <= 2 ** b
    if not one_grid_per_group:
        return
    for gi, (g, b) in enumerate(zip(groups, bits_of_group)):
        if b >= 16:
            continue
        for row in W[:, g]:
            assert torch.unique(row).numel() <= 2 ** b, f"group {gi}: more than 2^{b} values in a row"


# ---------------------------------------------------------------- sparsity
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_unstructured_sparsity_exact_per_row(sparsity, blocksize):
    X, W = calibration(), weights()
    C = W.shape[1]
    k = round(sparsity * C)
    dense = solver_for(X).solve([W], [torch.arange(C)], [[16]], sparsity=sparsity, blocksize=blocksize, mask_scope="row")[0]
    assert torch.equal((dense.weight == 0).sum(1), torch.full((W.shape[0],), k))
    assert dense.sparsity == pytest.approx(k / C, abs=1e-12)
    quant = solver_for(X).solve([W], [torch.arange(C)], [[4]], sparsity=sparsity, blocksize=blocksize, mask_scope="row")[0]
    assert quant.sparsity == pytest.approx(k / C, abs=1e-12)
    assert torch.all((quant.weight == 0).sum(1) >= k)  # quantization may round a few more to 0


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("layout", ["plain", "act_order", "mixed_random_groups"])
def test_nm_pattern_in_original_column_order(n, m, layout):
    """Every row and every M consecutive input channels hold at least N zeros (exactly N
    without quantization), whatever column order the solver uses internally."""
    X, W = calibration(), weights()
    R, C = W.shape
    if layout == "mixed_random_groups":
        groups = group_channels("random", 4, seed=3, columns=C)
        kw = dict(act_order=True)
    else:
        groups = [torch.arange(C)]
        kw = dict(act_order=layout == "act_order")
    for b in (16, 3):
        res = solver_for(X).solve([W], groups, [[b] * len(groups)], prunen=n, prunem=m, blocksize=16, **kw)[0]
        zeros = (res.weight.reshape(R, C // m, m) == 0).sum(2)
        if b == 16:
            assert torch.all(zeros == n), f"{n}:{m} pattern broken ({layout}): zeros per block {zeros.unique().tolist()}"
        else:
            assert torch.all(zeros >= n), f"{n}:{m} pattern broken ({layout}, {b} bits)"
        assert res.sparsity == pytest.approx(n / m, abs=1e-12)


# ---------------------------------------------------------------- quantization grid
@pytest.mark.parametrize("grouping", ["contiguous", "random"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("act_order", [False, True])
def test_mixed_bits_on_grid(grouping, sparsity, act_order):
    C = 128
    X, W = calibration(C=C), weights(C=C)
    groups = group_channels(grouping, 4, seed=1, columns=C)  # 4 groups of 32 channels
    bits = [2, 3, 4, 8]
    res = solver_for(X).solve([W], groups, [bits], sparsity=sparsity, act_order=act_order)[0]
    assert torch.isfinite(res.weight).all()
    check_grid(res, bits, groups)
    if sparsity:
        assert torch.all((res.weight == 0).sum(1) >= C // 2)
    assert res.avg_bits == pytest.approx(sum(b * g.numel() for b, g in zip(bits, groups)) / C)


def test_shared_input_linears_keep_their_own_bits():
    """q/k/v-style: several weights sharing one Hessian, each with its own widths per group."""
    C = 96
    X = calibration(C=C)
    Ws = [weights(24, C, seed=s) for s in (1, 2, 3)]
    groups = group_channels("contiguous", 3, columns=C)
    bits = [[2, 3, 4], [4, 3, 2], [8, 16, 2]]
    res = solver_for(X).solve(Ws, groups, bits, sparsity=0.5)
    for r, b, W in zip(res, bits, Ws):
        assert r.weight.shape == W.shape
        check_grid(r, b, groups)
        assert torch.all((r.weight == 0).sum(1) >= C // 2)
    # the 16-bit group of the third weight is left unquantized: its kept weights stay distinct
    kept = res[2].weight[:, groups[1]]
    for row in kept:
        assert torch.unique(row[row != 0]).numel() == int((row != 0).sum())


@pytest.mark.parametrize("groupsize", [16, 32])
def test_uniform_groupsize_runs_on_grid(groupsize):
    C = 128
    X, W = calibration(C=C), weights(C=C)
    res = solver_for(X).solve([W], [torch.arange(C)], [[3]], groupsize=groupsize)[0]
    assert len(res.runs) == C // groupsize
    assert all(e - s == groupsize for s, e, _ in res.runs)
    check_grid(res, [3], [torch.arange(C)], one_grid_per_group=False)
    assert torch.equal(res.perm, torch.arange(C))  # no act_order: runs are consecutive columns


@pytest.mark.parametrize("target", [2.5, 3.0, 3.125, 3.5, 4.25])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_allocated_bits_meet_target(target, sparsity):
    C = 64
    X, W = calibration(C=C), weights(C=C)
    solver = solver_for(X)
    H = solver.hessian().clone()  # the solve consumes the solver's Hessian
    groups = group_channels("contiguous", 8, columns=C)  # sizes 8: every multiple of 1/8 is reachable
    cands = list(range(2, 9))
    err = cluster_errors(W, H, groups, cands, sparsity)
    bits = allocate_bits(err, [g.numel() for g in groups], cands, target)
    res = solver.solve([W], groups, [bits], sparsity=sparsity, act_order=True)[0]
    assert res.avg_bits <= target + 1e-9
    assert res.avg_bits >= target - 0.01
    check_grid(res, bits, groups)


def test_blocksize_does_not_change_quantization():
    """Lazy block updates are exact algebra: quantization alone must give the same weights
    (up to float rounding flipping a rare grid point) whatever the block size."""
    X, W = calibration(C=128), weights(C=128)
    a = solver_for(X).solve([W], [torch.arange(128)], [[3]], groupsize=32, blocksize=16)[0].weight
    b = solver_for(X).solve([W], [torch.arange(128)], [[3]], groupsize=32, blocksize=128)[0].weight
    assert ((a - b).abs() <= 1e-4).float().mean() > 0.99  # grids fitted at other times differ by rounding
    assert out_err(X, W, a) == pytest.approx(out_err(X, W, b), rel=1e-2)


# ---------------------------------------------------------------- against baselines
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groupsize", [-1, 16])
def test_solver_beats_round_to_nearest(bits, groupsize):
    X, W = calibration(), weights()
    held_out = calibration(draw=1)
    res = solver_for(X).solve([W], [torch.arange(W.shape[1])], [[bits]], groupsize=groupsize)[0]
    Q_rtn, _, _ = rtn_quantize(W, bits, groupsize)
    assert out_err(X, W, res.weight) < out_err(X, W, Q_rtn)
    assert out_err(held_out, W, res.weight) < out_err(held_out, W, Q_rtn)


def test_mixed_solver_beats_round_to_nearest_at_same_bits():
    C = 128
    X, W = calibration(C=C), weights(C=C)
    groups = group_channels("contiguous", 4, columns=C)
    res = solver_for(X).solve([W], groups, [[3, 3, 3, 3]], act_order=True)[0]
    Q_rtn, _, _ = rtn_quantize(W, 3, 32)  # the same 32-column grids, fitted by min-max
    assert out_err(X, W, res.weight) < out_err(X, W, Q_rtn)


@pytest.mark.parametrize("cfg", [CompressConfig(sparsity=0.5), CompressConfig(prunen=2, prunem=4)],
                         ids=["50%", "2:4"])
def test_sparsegpt_beats_magnitude_pruning(cfg):
    X, W = calibration(), weights()
    res = solver_for(X).solve([W], [torch.arange(W.shape[1])], [[16]], sparsity=cfg.sparsity,
                              prunen=cfg.prunen, prunem=cfg.prunem, blocksize=16)[0]
    mag = magnitude_prune(W, cfg.sparsity, cfg.prunen, cfg.prunem)
    assert (mag == 0).float().mean() == pytest.approx(0.5)
    assert out_err(X, W, res.weight) < 0.8 * out_err(X, W, mag)


def test_joint_prune_quantize_beats_magnitude_then_rtn():
    X, W = calibration(), weights()
    res = solver_for(X).solve([W], [torch.arange(64)], [[4]], sparsity=0.5)[0]
    mag = magnitude_prune(W, sparsity=0.5)
    Q, _, _ = rtn_quantize(mag, 4)
    Q = Q * (mag != 0)
    assert out_err(X, W, res.weight) < out_err(X, W, Q)


# ---------------------------------------------------------------- degenerate inputs
def test_dead_input_channel():
    X, W = calibration(), weights()
    X[:, [5, 40]] = 0  # channels that never fire
    groups = group_channels("contiguous", 4, columns=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dead channel is normal, not worth a warning
        res = solver_for(X).solve([W], groups, [[2, 3, 4, 8]], sparsity=0.5, act_order=True)[0]
    assert torch.isfinite(res.weight).all()
    assert res.sparsity == 0.5
    check_grid(res, [2, 3, 4, 8], groups)
    dense = solver_for(X).solve([W], [torch.arange(64)], [[16]], sparsity=0.5)[0]
    assert torch.isfinite(dense.weight).all()
    assert torch.all((dense.weight == 0).sum(1) == 32)
    assert out_err(X, W, dense.weight) < out_err(X, W, magnitude_prune(W, sparsity=0.5))


def test_all_inputs_zero():
    W = weights()
    res = solver_for(torch.zeros(64, 64)).solve([W], [torch.arange(64)], [[4]], sparsity=0.5)[0]
    assert torch.isfinite(res.weight).all()


@pytest.mark.parametrize("percdamp", [1e-8, 1e-12])
def test_singular_hessian_falls_back(percdamp):
    """Rank-8 Hessian of 64 channels: the Cholesky fails at a tiny damping; the solver must
    raise the damping (a warning is fine) and still return finite, exactly sparse weights."""
    g = torch.Generator().manual_seed(0)
    X = 100 * torch.randn(8, 64, generator=g)
    W = weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = solver_for(X).solve([W], [torch.arange(64)], [[4]], sparsity=0.5, percdamp=percdamp)[0]
    assert torch.isfinite(res.weight).all()
    assert res.sparsity == 0.5
    check_grid(res, [4], [torch.arange(64)])


# ---------------------------------------------------------------- memory: same results, fewer buffers
def _same(a, b) -> bool:
    return all(torch.equal(x.weight, y.weight) and x.loss == y.loss and torch.equal(x.scale, y.scale)
               and torch.equal(x.zero, y.zero) and torch.equal(x.perm, y.perm) for x, y in zip(a, b))


@pytest.mark.parametrize("percdamp", [0.01, 1e-12])
def test_spilled_hessian_gives_the_same_solve(percdamp, monkeypatch):
    """spill=True (H freed once factored, its factor kept instead) returns what the plain solve
    returns. When the factor of the inverse fails (forced here by failing the first finiteness
    check) the damping is raised and the retry starts from H rebuilt as L L^T: on a well-posed
    Hessian the same weights as the plain retry; on a degenerate one (8 samples, 96 channels)
    float rounding of the rebuilt H moves the result, which stays finite and of the same error."""
    import sparsegpt_mi
    X = calibration(C=96) if percdamp > 1e-8 else 100 * torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    Ws = [weights(24, 96, 1), weights(16, 96, 2)]
    groups = group_channels("random", 3, columns=96)
    args = (Ws, groups, [[4, 3, 2], [2, 3, 4]])
    kw = dict(sparsity=0.5, act_order=True, percdamp=percdamp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = solver_for(X).solve(*args, **kw, spill=False)
        assert _same(plain, solver_for(X).solve(*args, **kw, spill=True))
        real, calls = sparsegpt_mi.all_finite, []

        def fail_first(t):  # the first check of each solve fails
            calls.append(1)
            return len(calls) % 2 == 0 and real(t)
        monkeypatch.setattr(sparsegpt_mi, "all_finite", fail_first)
        retried = [solver_for(X).solve(*args, **kw, spill=s) for s in (False, True)]
        assert len(calls) == 4  # each solve retried once
    assert not _same(plain, retried[0])  # the retry did raise the damping
    for x, y in zip(*retried):
        assert torch.isfinite(y.weight).all()
        if percdamp > 1e-8:
            assert torch.equal(x.weight, y.weight) and y.loss == pytest.approx(x.loss, rel=1e-5)
        else:
            assert 0.5 < y.loss / x.loss < 2


def test_permute_symmetric_and_all_finite_in_pieces():
    from sparsegpt_mi import all_finite, permute_symmetric
    X = calibration(C=70)
    H = X.t() @ X
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(3))
    for rows in (1, 8, 1024):
        assert torch.equal(permute_symmetric(H, perm, rows), H[perm][:, perm])
    assert all_finite(H, 8)
    for bad in (float("nan"), float("inf")):
        G = H.clone()
        G[69, 3] = bad
        assert not all_finite(G, 8)


def test_cluster_errors_in_row_pieces_equal_one_pass():
    """The allocation errors worked through a few rows at a time (max_bytes) equal one pass bit for
    bit, pruned or not, one linear or several stacked."""
    X = calibration(C=64)
    H = X.t() @ X / X.shape[0]
    W = torch.cat([weights(40, 64, 1), weights(23, 64, 2)])
    groups = group_channels("random", 4, columns=64)
    for sparsity, splits in ((0.0, None), (0.5, [40, 23])):
        one = cluster_errors(W, H, groups, [2, 3, 4, 8], sparsity, row_splits=splits)
        for rows in (1, 7, 40):
            assert torch.equal(cluster_errors(W, H, groups, [2, 3, 4, 8], sparsity, row_splits=splits,
                                              max_bytes=4 * 64 * rows), one)
