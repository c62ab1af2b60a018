"""The solver: SparseGPT joint pruning + quantization with OBS error compensation.

One `LinearSolver` per set of linears that share an input (q/k/v, gate/up, or a
single linear): `add_batch` accumulates the Hessian H = 2/n sum x x^T (and the
channel sums the MI estimator needs), `solve` prunes and quantizes the stacked
weights column by column while compensating the error on the columns not yet
processed (Frantar & Alistarh 2023, Alg. 1), `free` drops the buffers.

Mixed precision: the input channels are split into groups (clusters), each with
its own bit width per linear. Columns are permuted so every group is contiguous
(inside a group by descending Hessian diagonal); scale and zero are fitted per
output row and group when the solver enters the group, on the error-updated
weights; the permutation is undone at the end. This file prints nothing.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass

import torch

from quant import accumulate_xtx, fit_grid, hessian_order, quantize, row_pieces, run_sizes


@dataclass
class SolveResult:
    """Figures for one linear after `LinearSolver.solve`."""
    weight: torch.Tensor          # (out, in), compressed, in the original column order
    loss: float                   # sum over rows of the OBS error sum (w-q)^2 / [H^-1]_jj^2 / 2
    sparsity: float
    avg_bits: float               # weighted by weights per group (16 if unquantized)
    seconds: float
    perm: torch.Tensor | None = None     # (in,) solver column order: column k of the order is perm[k]
    runs: list[tuple[int, int, int]] | None = None  # (start, end, bits) in permuted columns, one grid each
    scale: torch.Tensor | None = None    # (out, n_runs) fp32 grid step per row and run
    zero: torch.Tensor | None = None     # (out, n_runs) integer zero point per row and run


class LinearSolver:
    """Hessian statistics and the joint prune + quantize solve for linears sharing one input."""

    def __init__(self, columns: int, device: torch.device):
        self.columns = columns
        self.device = device
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.xsum = torch.zeros(columns, device=device, dtype=torch.float32)
        self.nsamples = 0  # tokens seen
        self._scaled = False

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate statistics of one batch of layer inputs (..., C)."""
        assert not self._scaled, "add_batch after hessian()"
        X = inp.reshape(-1, inp.shape[-1])  # (n, C)
        accumulate_xtx(self.H, X)
        self.xsum += X.sum(0, dtype=torch.float32)
        self.nsamples += X.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n sum x x^T (fp32, (C, C)); scaled in place once the batches are in."""
        if not self._scaled:
            self.H.mul_(2.0 / max(self.nsamples, 1))
            self._scaled = True
        return self.H

    def mean(self) -> torch.Tensor:
        return self.xsum / max(self.nsamples, 1)

    def absorb(self, other: "LinearSolver") -> None:
        """Add the statistics another solver (another device's share of the batches) gathered."""
        assert not (self._scaled or other._scaled), "absorb before hessian()"
        self.H += other.H.to(self.device)
        self.xsum += other.xsum.to(self.device)
        self.nsamples += other.nsamples

    def copy_to(self, device: torch.device) -> "LinearSolver":
        """A solver on `device` holding a copy of these statistics (scaled as they are now):
        several devices can then each solve their own rows against the same H."""
        twin = LinearSolver.__new__(LinearSolver)
        twin.columns, twin.device, twin.nsamples, twin._scaled = self.columns, device, self.nsamples, self._scaled
        twin.H = self.H.to(device, copy=True)
        twin.xsum = self.xsum.to(device, copy=True)
        return twin

    def solve(self, *args, **kwargs) -> list[SolveResult]:
        """Prune and quantize: `solve_steps` run to the end (same arguments)."""
        steps = self.solve_steps(*args, **kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    @torch.no_grad()
    def solve_steps(
        self,
        weights: list[torch.Tensor],
        groups: list[torch.Tensor],
        bits: list[list[int]],
        sparsity: float = 0.0,
        prunen: int = 0,
        prunem: int = 0,
        groupsize: int = -1,
        sym: bool = False,
        percdamp: float = 0.01,
        blocksize: int = 128,
        act_order: bool = False,
        mask_scope: str = "row",
        use_kernel: bool = True,
        mse: bool = False,
        spill: bool | None = None,
    ):
        """Prune and quantize `weights` (each (out_i, C)) jointly; they share H.

        groups: input-channel index tensors partitioning range(C) (one group = all channels
        for uniform mode). bits[i][g]: bit width of group g in weight i (16 = keep floats).
        groupsize > 0 additionally splits each group into runs of `groupsize` columns with
        their own scale/zero (uniform GPTQ-style g128). mask_scope "row": unstructured masks
        exact per output row (default); "block": one threshold per block over all rows, as the
        reference SparseGPT. use_kernel: on CUDA, run each block's column loop as one fused
        kernel (solver_kernel.py) instead of ~15 small launches per column. mse: each grid's
        range is searched for the least |w - q|^2.4 (quant.fit_grid) instead of min-max.
        spill: free the damped Hessian once it is factored and keep its factor instead (one C x C
        buffer less at the peak, no host memory; see _inverse_cholesky; None: on CUDA where H is
        256 MiB or more, i.e. 8192 columns or more: a 7B down_proj's 11008). Nothing here changes
        the result, except after a failed factorization of the inverse (rare), where the retry
        starts from the rebuilt H: equal up to float rounding.

        A generator: it yields after each block of columns (its kernels queued, nothing waited
        for) and returns one SolveResult per weight, so that one thread can keep several
        devices busy by stepping their solves in turn (parallel.interleave); `solve` runs it
        to the end.
        """
        tick = time.perf_counter()
        C = self.columns
        dev = self.device
        W = torch.cat([w.to(dev, torch.float32) for w in weights], 0)  # (R, C)
        R = W.shape[0]
        rows = [w.shape[0] for w in weights]
        H = self.hessian()
        self.H = None  # the solve owns (and overwrites) the Hessian: one C x C buffer less

        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        # column order: group after group; inside a group by descending diag(H) when
        # act_order (or always in mixed mode, where it is the order the method prescribes)
        diag = torch.diag(H)
        order = []
        for g in groups:
            g = g.to(dev)
            order.append(hessian_order(g, diag) if act_order else torch.sort(g).values)
        perm = torch.cat(order)
        assert perm.numel() == C, "groups must partition the input channels"
        invperm = torch.argsort(perm)
        identity = torch.equal(perm, torch.arange(C, device=dev))
        del diag
        if not identity:
            W = W[:, perm]
            H = permute_symmetric(H, perm)

        # per-column: group id; per (row, group): maxq. 16 bits = no quantization.
        sizes = [int(g.numel()) for g in groups]
        col_group = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes)).tolist()
        bits_rg = torch.cat([torch.tensor(b, dtype=torch.float32).expand(r, -1) for b, r in zip(bits, rows)], 0)
        bits_rg = bits_rg.to(dev)  # (R, G)
        maxq_rg = 2.0 ** bits_rg - 1
        bounds = [0]  # a fresh scale/zero where a group, or a groupsize run inside it, begins
        for s in sizes:
            for n in run_sizes(s, groupsize):
                bounds.append(bounds[-1] + n)

        if spill is None:
            spill = dev.type == "cuda" and C * C * 4 >= 2 ** 28
        box = [H]  # the factorization takes H over, so that it can free it early
        del H
        Hinv = yield from self._inverse_cholesky(box, percdamp, spill)
        # N:M must hold on consecutive *original* columns (what sparse kernels need). When the
        # columns are permuted, the mask is chosen once up front by the OBS saliency
        # w^2 / [H^-1]_jj instead of adaptively inside the blocks.
        nm_fixed = None
        if prunen and not identity:
            hinv_diag = (Hinv ** 2).sum(0)[invperm]  # diag(H^-1) = diag(U^T U), original order
            sal = (W[:, invperm] ** 2 / hinv_diag[None, :]).reshape(R, C // prunem, prunem)
            idx = torch.topk(sal, prunen, dim=2, largest=False).indices
            nm_fixed = torch.zeros_like(sal, dtype=torch.bool).scatter_(2, idx, True).reshape(R, C)[:, perm]
        run_starts = bounds[:-1]
        scales = torch.ones(R, len(run_starts), device=dev)
        zeros = torch.zeros(R, len(run_starts), device=dev)
        Losses = torch.zeros(R, device=dev)
        mask = torch.zeros_like(W, dtype=torch.bool)
        block_fn = _block_triton if (dev.type == "cuda" and use_kernel) else _block_torch

        # blocks never straddle a run, so each run's grid is fitted at a block start, where
        # every update of the columns before it has been applied (W is exact there)
        for r_idx, (s0, e0) in enumerate(zip(run_starts, bounds[1:])):
            g = col_group[s0]
            maxq = maxq_rg[:, g].contiguous()
            qon = bits_rg[:, g] < 16
            quant = any(b[g] < 16 for b in bits)  # from the host's copy: no device sync
            if quant:
                scale, zero = fit_grid(W[:, s0:e0], maxq, sym, mse, kernel=use_kernel)
                scales[:, r_idx] = scale
                zeros[:, r_idx] = zero
            else:
                scale, zero = torch.ones(R, device=dev), torch.zeros(R, device=dev)
            for i1 in range(s0, e0, blocksize):
                i2 = min(i1 + blocksize, e0)
                d1 = torch.diag(Hinv)[i1:i2]
                mask1 = None if nm_fixed is None else nm_fixed[:, i1:i2].clone()
                if prunen == 0 and sparsity > 0:
                    # prune the smallest OBS saliencies w^2 / [H^-1]_jj^2 (Sec. 3.2 adaptive mask)
                    sal = W[:, i1:i2] ** 2 / d1[None, :] ** 2
                    if mask_scope == "row":  # exact per row: cumulative target rounded per block
                        mask1 = torch.zeros_like(sal, dtype=torch.bool)
                        target = round(sparsity * i2) - round(sparsity * i1)
                        if target > 0:
                            mask1.scatter_(1, torch.topk(sal, target, dim=1, largest=False).indices, True)
                    else:
                        mask1 = sal <= torch.sort(sal.flatten()).values[int(sal.numel() * sparsity)]
                Err1, mask1 = block_fn(W, i1, i2, Hinv, mask1, prunen if nm_fixed is None else 0, prunem,
                                       scale, zero, maxq, qon, quant)
                mask[:, i1:i2] = mask1
                Losses += (Err1 ** 2).sum(1) / 2
                W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update
                yield

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        W = W[:, invperm]
        mask = mask[:, invperm]
        seconds = time.perf_counter() - tick
        results = []
        r0 = 0
        size_t = torch.tensor(sizes, dtype=torch.float32)
        for w, r, b in zip(weights, rows, bits):
            Wi = W[r0:r0 + r]
            avg = float((torch.tensor(b, dtype=torch.float32) * size_t).sum() / C)
            results.append(SolveResult(
                weight=Wi.to(w.dtype),
                loss=float(Losses[r0:r0 + r].sum()),
                sparsity=float(mask[r0:r0 + r].float().mean()),
                avg_bits=avg,
                seconds=seconds * r / R,
                perm=perm.cpu(),
                runs=[(s0, e0, int(b[col_group[s0]])) for s0, e0 in zip(run_starts, bounds[1:])],
                scale=scales[r0:r0 + r].cpu(),
                zero=zeros[r0:r0 + r].cpu(),
            ))
            r0 += r
        return results

    @staticmethod
    def _inverse_cholesky(box: list, percdamp: float, spill: bool = False):
        """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H); on failure
        the damping grows tenfold (with a warning). box holds H, which is damped in place and
        freed as soon as it is no longer needed. The factor of the inverse is computed in the
        inverse's own memory. spill: once H is factored, H is freed and its factor L kept in its
        place, so that at most two C x C buffers are live (H and L, then L and the inverse); in
        the rare case that the inverse cannot be factored, the damped H is rebuilt as L L^T for
        the retry (equal to it up to float rounding). Without spill, H is kept and L freed: three
        buffers at the peak, and a retry starts from H itself. A generator (see solve_steps): it
        yields after queueing each factorization, before its result is checked."""
        H = box.pop()
        mean_diag = torch.mean(torch.diag(H))
        damp, added = percdamp, 0.0
        info2 = torch.empty((), dtype=torch.int32, device=H.device)
        # at least 6 tries, and enough for the damping to reach mean(diag H) itself
        for _ in range(max(6, math.ceil(-math.log10(max(percdamp, 1e-30))) + 1)):
            H.diagonal().add_(damp * mean_diag - added)
            added = damp * mean_diag
            L, info = torch.linalg.cholesky_ex(H)
            yield
            if int(info) == 0:
                if spill:
                    del H
                Hinv = torch.cholesky_inverse(L)
                if not spill:
                    L = None
                U, _ = torch.linalg.cholesky_ex(Hinv, upper=True, out=(Hinv, info2))  # in place
                del Hinv
                yield
                if int(info2) == 0 and all_finite(U):
                    L = None  # before the row-major copy below: two buffers at most
                    if damp != percdamp:
                        warnings.warn(f"Cholesky failed at percdamp {percdamp}; succeeded with damping {damp:g}"
                                      " (pass a larger --percdamp or more --nsamples to avoid this)")
                    return U.contiguous()  # row-major: the fused kernel reads rows of it
                del U
                if spill:  # the damped H back from its factor, for the retry
                    H = L @ L.t()
            L = None
            damp *= 10
        raise RuntimeError(f"Cholesky failed even with damping {damp / 10:g}: "
                           "the Hessian is degenerate; use more --nsamples or a larger --percdamp")

    def free(self) -> None:
        self.H = None
        self.xsum = None


def permute_symmetric(H: torch.Tensor, perm: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """H[perm][:, perm], built a piece of rows at a time: one C x C buffer besides H instead of
    two (the gathers are the same, so is the result)."""
    rows = rows or row_pieces(H.shape[0])
    out = torch.empty_like(H)
    for r0 in range(0, H.shape[0], rows):
        out[r0:r0 + rows] = H[perm[r0:r0 + rows]][:, perm]
    return out


def all_finite(t: torch.Tensor, rows: int | None = None) -> bool:
    """torch.isfinite(t).all(), a piece of rows at a time (isfinite makes several full-size
    temporaries), with one wait for the device."""
    rows = rows or row_pieces(t.shape[0])
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for r0 in range(0, t.shape[0], rows):
        ok &= torch.isfinite(t[r0:r0 + rows]).all()
    return bool(ok)


def merge_row_shares(shares: list[list[SolveResult]], device: torch.device | None = None) -> list[SolveResult]:
    """One SolveResult per weight from solves of row shares of the same weights against the
    same H (shares[k][i]: share k's rows of weight i, in row order). Rows are independent
    given H, so concatenating them is the whole solve. The column order, runs and widths
    depend on H and the groups only and must agree across shares."""
    merged = []
    for parts in zip(*shares):
        first = parts[0]
        for p in parts[1:]:
            if not (torch.equal(p.perm, first.perm) and p.runs == first.runs):
                raise RuntimeError("row shares of one solve disagree on the column order; the devices computed "
                                   "different results from the same Hessian")
        rows = [p.weight.shape[0] for p in parts]
        dev = device or first.weight.device
        merged.append(SolveResult(
            weight=torch.cat([p.weight.to(dev) for p in parts], 0),
            loss=sum(p.loss for p in parts),
            sparsity=sum(p.sparsity * r for p, r in zip(parts, rows)) / max(sum(rows), 1),
            avg_bits=first.avg_bits,
            seconds=max(p.seconds for p in parts),
            perm=first.perm, runs=first.runs,
            scale=None if first.scale is None else torch.cat([p.scale for p in parts], 0),
            zero=None if first.zero is None else torch.cat([p.zero for p in parts], 0),
        ))
    return merged


def _block_torch(W: torch.Tensor, i1: int, i2: int, Hinv: torch.Tensor, mask1: torch.Tensor | None,
                 prunen: int, prunem: int, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                 qon: torch.Tensor, quant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column OBS step over W[:, i1:i2] (Alg. 1 inner loop): prune (adaptive N:M when
    prunen), quantize on the row grids, spread each column's error over the block's later
    columns. Writes the result into W[:, i1:i2]; returns the scaled errors Err1 and the mask."""
    W1 = W[:, i1:i2].clone()
    count = i2 - i1
    Hinv1 = Hinv[i1:i2, i1:i2]
    d1 = torch.diag(Hinv1)
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    mask1 = torch.zeros_like(W1, dtype=torch.bool) if mask1 is None else mask1
    for i in range(count):
        w = W1[:, i]
        if prunen and i % prunem == 0:
            sal = W1[:, i:i + prunem] ** 2 / d1[i:i + prunem][None, :] ** 2
            mask1.scatter_(1, i + torch.topk(sal, prunen, dim=1, largest=False).indices, True)
        q = torch.where(qon, quantize(w, scale, zero, maxq), w) if quant else w
        q = q.masked_fill(mask1[:, i], 0)
        Q1[:, i] = q
        err = (w - q) / d1[i]
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
        Err1[:, i] = err
    W[:, i1:i2] = Q1
    return Err1, mask1


@functools.cache
def _fused_block():
    """solver_kernel.obs_block, or None (with one warning) where Triton is not installed."""
    try:
        from solver_kernel import obs_block
    except ImportError as e:
        warnings.warn(f"Triton is not available ({e}); the solver runs its slower column loop")
        return None
    return obs_block


def _block_triton(W, i1, i2, Hinv, mask1, prunen, prunem, scale, zero, maxq, qon, quant):
    """The same step as `_block_torch`, fused into one kernel launch (Triton); falls back to
    `_block_torch` where Triton is not installed."""
    kernel = _fused_block() or _block_torch
    return kernel(W, i1, i2, Hinv, mask1, prunen, prunem, scale, zero, maxq, qon, quant)
