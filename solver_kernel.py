"""Fused CUDA kernel (Triton) for the solver's inner loop over the columns of one block.

The reference loop launches ~15 small kernels per column, so a 7B layer spends seconds in
launch overhead. Rows are independent in the OBS update (only the column order is
sequential), so one program owns BLOCK_R rows of the block in registers and walks its
columns: adaptive N:M choice, quantization on the row's grid, the pruning mask, and the
rank-1 update of the remaining columns with row i of the block's inverse-Hessian factor.
It computes what `sparsegpt_mi._block_torch` computes (tested against it on the GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from parallel import on_device


@triton.jit
def _obs_block_kernel(W, stride_w, Err, Hinv, stride_h, Mask, scale_p, zero_p, maxq_p, qon_p,
                      R, count,
                      QUANT: tl.constexpr, PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rm = rows < R
    cm = cols < count
    m2 = rm[:, None] & cm[None, :]
    w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=m2, other=0.0)
    pm = tl.load(Mask + rows[:, None] * BLOCK_C + cols[None, :], mask=m2, other=0) != 0
    dvec = tl.load(Hinv + cols * stride_h + cols, mask=cm, other=1.0)
    if QUANT:
        s = tl.load(scale_p + rows, mask=rm, other=1.0)
        z = tl.load(zero_p + rows, mask=rm, other=0.0)
        mq = tl.load(maxq_p + rows, mask=rm, other=1.0)
        qo = tl.load(qon_p + rows, mask=rm, other=0) != 0
    err_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    q_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for i in range(0, count):
        sel = cols == i
        if PRUNE_N > 0:
            if i % PRUNE_M == 0:
                # saliency w^2 / d^2 of columns i .. i+M-1; prune the N smallest per row
                # (ties: the lower column first, as topk on equal values need not agree)
                sal = w * w / (dvec * dvec)[None, :]
                for a in tl.static_range(PRUNE_M):
                    sa = tl.sum(tl.where((cols == i + a)[None, :], sal, 0.0), axis=1)
                    rank = tl.zeros([BLOCK_R], dtype=tl.int32)
                    for b in tl.static_range(PRUNE_M):
                        sb = tl.sum(tl.where((cols == i + b)[None, :], sal, 0.0), axis=1)
                        smaller = (sb < sa) | ((sb == sa) & (b < a))
                        rank += smaller.to(tl.int32)
                    prune = rank < PRUNE_N
                    pm = pm | ((cols == i + a)[None, :] & prune[:, None])
        wi = tl.sum(tl.where(sel[None, :], w, 0.0), axis=1)
        d = tl.sum(tl.where(sel, dvec, 0.0), axis=0)
        q = wi
        if QUANT:
            qq = libdevice.rint(tl.math.div_rn(wi, s)) + z
            qq = tl.minimum(tl.maximum(qq, 0.0), mq)
            q = tl.where(qo, s * (qq - z), wi)
        pmi = tl.sum(tl.where(sel[None, :] & pm, 1, 0), axis=1) > 0
        q = tl.where(pmi, 0.0, q)
        e = tl.math.div_rn(wi - q, d)
        hrow = tl.load(Hinv + i * stride_h + cols, mask=cm & (cols >= i), other=0.0)
        w = w - e[:, None] * hrow[None, :]
        err_acc = tl.where(sel[None, :], e[:, None], err_acc)
        q_acc = tl.where(sel[None, :], q[:, None], q_acc)
    tl.store(W + rows[:, None] * stride_w + cols[None, :], q_acc, mask=m2)
    tl.store(Err + rows[:, None] * BLOCK_C + cols[None, :], err_acc, mask=m2)
    tl.store(Mask + rows[:, None] * BLOCK_C + cols[None, :], pm.to(tl.int8), mask=m2)


def obs_block(W: torch.Tensor, i1: int, i2: int, Hinv: torch.Tensor, mask1: torch.Tensor | None,
              prunen: int, prunem: int, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
              qon: torch.Tensor, quant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `_block_torch`: writes W[:, i1:i2]; returns Err1 (R, count) and the mask (R, count)."""
    R, C = W.shape
    count = i2 - i1
    BLOCK_C = max(16, triton.next_power_of_2(count))
    assert W.stride(1) == 1 and Hinv.stride(1) == 1 and count <= 128
    err = torch.empty(R, BLOCK_C, device=W.device, dtype=torch.float32)
    m8 = torch.zeros(R, BLOCK_C, device=W.device, dtype=torch.int8)
    if mask1 is not None:
        m8[:, :count] = mask1
    BLOCK_R = 16
    grid = (triton.cdiv(R, BLOCK_R),)
    with on_device(W.device):  # Triton launches on the current device, which need not be W's
        _obs_block_kernel[grid](
            W[:, i1:], W.stride(0), err, Hinv[i1:, i1:], Hinv.stride(0), m8,
            scale.float().contiguous(), zero.float().contiguous(), maxq.float().contiguous(),
            qon.to(torch.int8).contiguous(), R, count,
            QUANT=quant, PRUNE_N=prunen, PRUNE_M=max(prunem, 1), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
            num_warps=4)
    return err[:, :count], m8[:, :count].bool()


@triton.jit
def _mse_grid_kernel(W, stride_w, xmin_p, xmax_p, maxq_p, shrink_p, scale_out, zero_out, R, n, S,
                     SYM: tl.constexpr, TINY: tl.constexpr, NORM: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # program (pid, b): BLOCK_R rows at candidate width b; every range fraction is tried in turn
    # over the rows' columns, keeping the first with the least sum |w - q|^NORM (quant.fit_grid)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    xmin0 = tl.load(xmin_p + rows, mask=rm, other=-1.0)
    xmax0 = tl.load(xmax_p + rows, mask=rm, other=1.0)
    mq = tl.load(maxq_p + b * R + rows, mask=rm, other=1.0)
    cols = tl.arange(0, BLOCK_N)
    best = tl.full([BLOCK_R], float("inf"), tl.float32)
    best_s = tl.full([BLOCK_R], 1.0, tl.float32)
    best_z = tl.zeros([BLOCK_R], tl.float32)
    for si in range(0, S):
        sh = tl.load(shrink_p + si)
        lo = xmin0 * sh
        hi = xmax0 * sh
        flat = (lo == 0.0) & (hi == 0.0)
        lo = tl.where(flat, -1.0, lo)
        hi = tl.where(flat, 1.0, hi)
        sc = tl.math.div_rn(hi - lo, mq).to(tl.float16).to(tl.float32)
        sc = tl.maximum(sc, TINY)
        if SYM:
            z = (mq + 1.0) * 0.5
        else:
            z = tl.minimum(libdevice.rint(tl.math.div_rn(-lo, sc)), mq)
        err = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, n, BLOCK_N):
            cm = (c0 + cols) < n
            m2 = rm[:, None] & cm[None, :]
            w = tl.load(W + rows[:, None] * stride_w + (c0 + cols)[None, :], mask=m2, other=0.0)
            q = libdevice.rint(tl.math.div_rn(w, sc[:, None])) + z[:, None]
            q = tl.minimum(tl.maximum(q, 0.0), mq[:, None])
            d = tl.abs(sc[:, None] * (q - z[:, None]) - w)
            e = libdevice.pow(d, NORM)
            err += tl.sum(tl.where(m2, e, 0.0), axis=1)
        better = err < best
        best = tl.where(better, err, best)
        best_s = tl.where(better, sc, best_s)
        best_z = tl.where(better, z, best_z)
    tl.store(scale_out + b * R + rows, best_s, mask=rm)
    tl.store(zero_out + b * R + rows, best_z, mask=rm)


def mse_grid(W: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool,
             shrinks: list[float], tiny: float, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.fit_grid's clipping search in one launch: W (R, n) with unit column stride, the rows'
    ranges xmin/xmax (R,), maxq (B, R) (one row of widths per candidate). Returns scale, zero
    (B, R). The error sums are accumulated in another order than the PyTorch loop's, so a near
    tie between two range fractions can go the other way."""
    R, n = W.shape
    B = maxq.shape[0]
    W = W.float()
    if W.stride(1) != 1:
        W = W.contiguous()
    scale = torch.empty(B, R, device=W.device, dtype=torch.float32)
    zero = torch.empty(B, R, device=W.device, dtype=torch.float32)
    shrink = torch.tensor(shrinks, device=W.device, dtype=torch.float32)
    BLOCK_R, BLOCK_N = 16, 64
    with on_device(W.device):
        _mse_grid_kernel[(triton.cdiv(R, BLOCK_R), B)](
            W, W.stride(0), xmin.float().contiguous(), xmax.float().contiguous(), maxq.float().contiguous(),
            shrink, scale, zero, R, n, len(shrinks),
            SYM=sym, TINY=tiny, NORM=norm, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, num_warps=4,
            enable_fp_fusion=False)  # q * s - w rounded twice, as PyTorch's separate operations
    return scale, zero
