"""Quantization grids and the small numeric helpers that the solver, the MI estimator and the
bit allocation share: the min-max grid, rounding onto it, round-to-nearest and magnitude
pruning baselines, the storage cost of a grid, and fp32-accumulated matrix products."""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch


# ---------------------------------------------------------------- grids
SCALE_DTYPE = torch.float16  # grid steps are stored (and therefore fitted) in fp16
_TINY_SCALE = 2.0 ** -24      # the smallest positive fp16: a step never rounds to 0
MSE_SHRINK = torch.linspace(1.0, 0.5, 26).tolist()  # range fractions the MSE clipping search tries
MSE_NORM = 2.4                # as GPTQ's and llm-compressor's MSE observers


def _row_range(W: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of W (R, C): the range [xmin, xmax] containing 0 (symmetric about 0 if sym)."""
    xmin = W.min(dim=1).values.clamp(max=0)
    xmax = W.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    return xmin, xmax


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool, shrink: float | torch.Tensor = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16) and integer zero point of the range shrunk by `shrink` (a tensor of
    fractions broadcasts in front: one grid per fraction)."""
    xmin, xmax = xmin * shrink, xmax * shrink
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1), xmax)
    scale = ((xmax - xmin) / maxq).to(SCALE_DTYPE).float().clamp(min=_TINY_SCALE)
    zero = torch.full_like(scale, 0) + ((maxq + 1) / 2 if sym else torch.minimum(torch.round(-xmin / scale), maxq))
    return scale, zero


def fit_minmax(W: torch.Tensor, maxq: torch.Tensor, sym: bool = False, shrink: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (or symmetric) min-max grid per row of W (R, C), its range scaled by
    `shrink`; maxq (R,) = 2^bits - 1, or (B, 1) for B candidate widths at once, giving (B, R)
    grids.

    The range always contains 0, so zero is exactly on the grid (pruned weights stay 0). The
    scale is rounded to fp16, as it is stored, so the solver's error compensation sees the
    grid the file holds. Returns scale and integer zero point (float), shaped like maxq
    broadcast against (R,).
    """
    return _grid(*_row_range(W, sym), maxq, sym, shrink)


def fit_grid(W: torch.Tensor, maxq: torch.Tensor, sym: bool = False, mse: bool = False, kernel: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of W (R, C) (see fit_minmax for maxq and the shapes). mse: search the
    range fraction in MSE_SHRINK that minimises sum |w - q|^2.4 over the row (clipping the
    extremes trades their error for a finer step everywhere else), per row and width.

    On CUDA (kernel, Triton installed) the search is one fused launch (solver_kernel.mse_grid)
    instead of ~900 small ones (26 fractions x grid, rounding and error), which made most of a 7B
    layer's 60,000 kernel launches (bench/layer_profile.py). It sums each row's errors in another
    order, so a near tie between two fractions can go the other way; _mse_search is the reference."""
    xmin, xmax = _row_range(W, sym)
    if mse and kernel and W.is_cuda and _mse_kernel() is not None:
        R = W.shape[0]
        shape = torch.broadcast_shapes(maxq.shape, (R,))
        mq = torch.broadcast_to(maxq.float(), shape).reshape(-1, R)
        scale, zero = _mse_kernel()(W, xmin, xmax, mq, sym, MSE_SHRINK, _TINY_SCALE, MSE_NORM)
        return scale.reshape(shape), zero.reshape(shape)
    if not mse:
        return _grid(xmin, xmax, maxq, sym)
    return _mse_search(W, xmin, xmax, maxq, sym)


def _mse_search(W: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool,
                max_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_grid's clipping search in PyTorch: every fraction of MSE_SHRINK at once, over pieces of
    rows whose (fractions x widths x rows x columns) errors hold at most max_elems values; the
    first fraction with the least error wins. Equal, bit for bit, to trying the fractions one
    after another (the error sums run over the same columns in the same order;
    tests/test_stored_bits.py checks it against that loop), with 26 times fewer operations."""
    R, n = W.shape
    shape = torch.broadcast_shapes(maxq.shape, (R,))
    mq_all = torch.broadcast_to(maxq, shape)
    shrink = torch.tensor(MSE_SHRINK, dtype=torch.float32, device=W.device).reshape((-1,) + (1,) * len(shape))
    scale = torch.empty(shape, dtype=torch.float32, device=W.device)
    zero = torch.empty(shape, dtype=torch.float32, device=W.device)
    rows = max(1, max_elems // (len(MSE_SHRINK) * max(1, mq_all.numel() // max(R, 1)) * max(n, 1)))
    for r0 in range(0, R, rows):
        Wc, mq = W[r0:r0 + rows], mq_all[..., r0:r0 + rows]
        s, z = _grid(xmin[r0:r0 + rows], xmax[r0:r0 + rows], mq, sym, shrink)  # (fractions, ..., r)
        err = (quantize(Wc, s[..., None], z[..., None], mq[..., None]) - Wc).abs_().pow_(MSE_NORM).sum(-1)
        best = torch.argmin(err, 0, keepdim=True)  # the first of equal minima, as a strict-improvement loop keeps
        scale[..., r0:r0 + rows] = s.gather(0, best)[0]
        zero[..., r0:r0 + rows] = z.gather(0, best)[0]
    return scale, zero


@functools.cache
def _mse_kernel():
    """solver_kernel.mse_grid, or None where Triton is not installed."""
    try:
        from solver_kernel import mse_grid
    except ImportError:
        return None
    return mse_grid


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Round w to the grid scale * (q - zero), q in [0, maxq]; all arguments broadcast."""
    q = torch.minimum(torch.clamp(torch.round(w / scale) + zero, min=0), maxq)
    return scale * (q - zero)


def rtn_quantize(W: torch.Tensor, bits: int, groupsize: int = -1, sym: bool = False, mse: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest baseline: per row, or per `groupsize` consecutive columns (mse: with
    the clipping search). Returns the quantized weights (R, C) and scale, zero (R, n_runs)."""
    R, C = W.shape
    W = W.float()
    g = C if groupsize <= 0 else groupsize
    out = torch.empty_like(W)
    maxq = torch.full((R,), 2.0 ** bits - 1, device=W.device)
    scales, zeros = [], []
    for c0 in range(0, C, g):
        blk = W[:, c0:c0 + g]
        scale, zero = fit_grid(blk, maxq, sym, mse)
        out[:, c0:c0 + g] = quantize(blk, scale[:, None], zero[:, None], maxq[:, None])
        scales.append(scale)
        zeros.append(zero)
    return out, torch.stack(scales, 1), torch.stack(zeros, 1)


def magnitude_prune(W: torch.Tensor, sparsity: float = 0.0, prunen: int = 0, prunem: int = 0) -> torch.Tensor:
    """Baseline pruning by |w|: the smallest `sparsity` of each row (unstructured), or the N
    smallest of every M consecutive weights (N:M)."""
    R, C = W.shape
    if prunen:
        blocks = W.abs().reshape(R, C // prunem, prunem)
        idx = torch.topk(blocks, prunen, dim=2, largest=False).indices
        mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, idx, True).reshape(R, C)
    else:
        k = int(round(sparsity * C))
        mask = torch.zeros_like(W, dtype=torch.bool)
        if k:
            mask.scatter_(1, torch.topk(W.abs(), k, dim=1, largest=False).indices, True)
    return W.masked_fill(mask, 0)


def hessian_order(group: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """A group's columns by descending Hessian diagonal: the order the solver works through a
    group in (act-order, and always in MI mode), and so the order its runs are cut in."""
    return group[torch.argsort(diag[group], descending=True)]


def run_sizes(size: int, groupsize: int = -1) -> list[int]:
    """The runs (one grid per row each) a group of `size` columns is cut into: runs of
    `groupsize` columns and the rest last; one run without a groupsize. The solver, the
    allocation's error estimate and its bit costs all cut groups this way."""
    if groupsize <= 0 or size <= groupsize:
        return [size]
    return [min(groupsize, size - c) for c in range(0, size, groupsize)]


def group_overhead_bits(bits: list[int], sizes: list[int], groupsize: int = -1) -> float:
    """Storage bits per weight for the per-(row, group) fp16 scale and bits-wide zero of one
    linear, averaged over its weights; unquantized (16-bit) groups cost nothing."""
    C = sum(sizes)
    total = 0.0
    for b, s in zip(bits, sizes):
        if b >= 16:
            continue
        total += len(run_sizes(s, groupsize)) * (16 + b)
    return total / C


def row_pieces(n: int, parts: int = 16) -> int:
    """Rows per piece to work through an n-row matrix in about `parts` pieces, so that a
    piece's temporaries are a small fraction of a whole-matrix buffer (at least one row)."""
    return max(1, -(-n // parts))


# ---------------------------------------------------------------- matrix products
@functools.cache
def _has_mm_out_dtype(device: torch.device) -> bool:
    """Whether this torch build multiplies fp16 into fp32 directly (torch.mm(out_dtype=...))."""
    a = torch.zeros(16, 16, device=device, dtype=torch.float16)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


def mm_fp32(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B as fp32. fp16/bf16 inputs on CUDA run on the tensor cores with fp32
    accumulation (every fp16 product is exact); anything else is upcast to fp32."""
    if A.is_cuda and A.dtype in (torch.float16, torch.bfloat16) and _has_mm_out_dtype(A.device):
        return torch.mm(A, B, out_dtype=torch.float32)
    return A.float() @ B.float()


def accumulate_xtx(H: torch.Tensor, X: torch.Tensor) -> None:
    """H += X^T X in fp32 for X (n, C)."""
    H.add_(mm_fp32(X.t(), X))


@contextmanager
def exact_matmul():
    """TF32 off for the duration (the Hessian, the solve and the evaluation need fp32 products),
    restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
