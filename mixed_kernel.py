"""Fused Triton kernel for `mixed_linear.MixedBitLinear` on CUDA: y = x Wᵀ (+ bias) straight from
bit-packed codes of mixed widths (2..8 bits per input-channel run), never building W.

    python -m pytest -q tests_gpu/test_mixed_kernel.py        # on a CUDA machine
    TRITON_INTERPRET=1 python -m pytest -q tests/test_mixed_linear.py -k interpret   # on the CPU

Layout (built by `mixed_linear.MixedBitLinear.from_parts`; this file only reads it):
  kernel order  the solver's permuted columns sorted (stably) by their run's width, so every run
                stays contiguous and equal widths sit together; kcols[k] is the original input
                column of kernel column k. Columns are cut into tiles of 32; a tile's width is the
                largest width among its columns (only the tiles where two widths meet store a few
                codes wider than needed, which is exact: a b-bit code fits in any wider slot).
  width block   a maximal range of tiles of one width b; it starts at word row W0 of `qweight`
                and holds b*nt word rows for its nt tiles. Codes are split into planes of 4, 2
                and 1 bits so that no code straddles a 32-bit word:
                  b=2: [2]  3: [2,1]  4: [4]  5: [4,1]  6: [4,2]  7: [4,2,1]  8: [4,4]
                plane (bits pb, holding code bits [sh, sh+pb)) occupies word rows
                W0 + off*nt ... W0 + (off+pb)*nt, off the number of code bits below it (0, 2, 4, 6);
                column c of the block (0-based) is in word row c // (32/pb), at bit
                (c % (32/pb)) * pb. Each word row is (out_features,) int32: rows of W are
                contiguous, so a warp's loads are coalesced along the output dimension.
  units         the work list: a range [a, e) of kernel columns inside one run and one width
                block, at most `unit_k` long, with its width, run, W0, nt, block start and the
                run's zero stream.
  scale         (n_runs, out) per (run, row): the fp32 (or fp16) scale stored as raw int bits,
                so that casting the model (`.half()`) cannot round it.
  zero          int32 words: one little-endian bit stream per run, row r's zero point at bit r*zb
                (zb the run's width), each stream from a word boundary; a run's stream is named
                by zs = first word | zb << 27 (`_zero_points`).

One program computes, for one unit, BLOCK_N output rows and BLOCK_M tokens:
    y[m, r] += s[r] * (sum_k q[r, k] x[m, k] - z[r] * sum_k x[m, k])        (k in the unit)
with fp32 accumulation (tensor cores for BLOCK_M >= 16: integer codes are exact in fp16/bf16),
adds it atomically into an fp32 workspace, and the last program of each output tile (a counter
per tile) adds the bias, writes the output in the input's dtype and zeroes the workspace and the
counter for the next call. So one launch per linear.

Several tokens: from DENSE_MIN_TOKENS tokens (4) the forward does not run that kernel. `dequant_kernel`
decodes the codes into a dense (out, in) weight in kernel column order and x's dtype
(bit for bit `MixedBitLinear.dequantize()`, columns permuted), in one shared per-device buffer
(`dense_workspace`, as large as the largest linear), and cuBLAS multiplies it with x gathered into
kernel order once. One program per (tile of 32 kernel columns, BLOCK_N rows).

One token: `gemv_kernel` instead, or for the larger shapes (`pick_config`) `mixed_gemv.gemv_gl_kernel`,
the same arithmetic written in Gluon with explicit layouts (mixed_gemv.py), which also runs linears that
share an input as one launch (`group_config`, `mixed_linear.SharedInputGroup`). `gemv_kernel` (the same
layout and grid arithmetic as the fused kernel): a program owns BLOCK_N
rows and one part of the kernel columns (`MixedBitLinear.split_units`: about SPLIT parts of one
width each), runs one software pipeline through all of the part's units (the next step's words and
x, in the next unit when this one ends, loaded before this step's arithmetic), applies each run's
grid once per unit, and writes the output itself (one part) or through the same split-K finish;
only the widths in WMASK are compiled in; widths 2 and 4 are decoded where they sit (INPLACE,
`_inplace_dot`: +5% on the 7B layer, gemv-sweep-NVIDIA-H200-2026-12-01-inplace.md). H200, one token
(bench/results/inference-NVIDIA-H200-2026-12-01-final.md, e0f90a4): a LLaMA-2-7B layer at 3.5
bits 130 us against fp16 cuBLAS's 133 (1.02x; 0.80x while the pipeline restarted at every unit), a
70B layer 378 against 443 (1.17x); at 3.0 bits 1.08x and 1.27x. What limits it (Nsight Compute,
bench/results/ncu-NVIDIA-H200-2026-12-01.md, bench/NOTES.md row 25): ~10.7 instructions per weight
issued by 4 programs per SM (one wave), not the bandwidth (9% of DRAM peak). The same 4-bit step
stripped of the work list, grids, gather and split-K finish reaches 1.7-1.95x of fp16
(bench/gemv_step_probe.py), gemv_kernel on that layout 1.3x; the in-kernel gather of x and the
finish's counters cost 10-13% of a linear together (a scratch probe, bench/NOTES.md row 20); a 2D
variant at 96-166 registers, x loaded per slot, was 3-30% slower (2026-12-01, not committed).

The fused kernel (2 and 3 tokens) is exact to the output rounding, but slow: 0.16x of fp16 at 16
tokens, 0.04x at 128, bound by latency: each small program runs a serial chain of ~10 dependent
memory round trips and nothing is software-pipelined.
The dense path (H200, 3.5 bits, bench/results/inference-NVIDIA-H200-2026-12-01-final.md and
dense-path-NVIDIA-H200-2026-12-01.md): a whole LLaMA-2-7B or 70B layer at 16 and 128 tokens takes
0.31-0.35x of fp16 cuBLAS; per linear at 128 tokens 4096x4096 42 us against fp16's 14, 11008x4096
86 against 28. The decode alone takes 20.6 and 50.3 us of that (71 registers; at 96, before the
tile table named its first run's grid, 26.4 and 66.0), about 2.5x what its bytes need at full
bandwidth: it is what to speed up next for prefill. At 16 tokens the
dense path was already faster than the fused kernel (38 vs 78 us for 4096x4096), and at 4 and 8
tokens too (4096x4096: 37.5 vs 54.5 and 59.8 us; 11008x4096: 82 vs 124 and 137 us;
bench/results/dense-path-NVIDIA-H200-2026-11-30.md), so DENSE_MIN_TOKENS is 4; at one token the
fused kernel is faster (29.7 us tuned); 2 and 3 tokens are not measured.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from parallel import on_device

WMASK_ALL = sum(1 << b for b in range(2, 9))  # gemv_kernel's widths 2..8, every one compiled in
UNIT_FIELDS = 8  # int32 per unit: a, e, bits, run, W0, nt, block start, zero stream (offset | width << 27)
_MAGIC = 0x4B000000  # float32 2**23: (q | MAGIC) read as float32 is 2**23 + q for 0 <= q < 2**23


@triton.jit
def _as_float(q):
    """Exact int -> fp32 for 0 <= q < 2**23 without the slow conversion unit: OR in the exponent
    of 2**23 and subtract it (one logic op and one add)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _tile_dot(x_ptr, kcol_ptr, qw_ptr, N, xrow, rows, rmask, t, a, e, start, W0, nt, acc, xsum,
              BITS: tl.constexpr, GATHER: tl.constexpr):
    """One token, one tile t (block-relative index) of a width-BITS block: acc (P0, BLOCK_N) +=
    code * x, xsum (P0,) += x. Plane 0 has P0 words per tile; each word is loaded once and its
    slots are taken apart in registers; the bits of the narrower planes are ORed into the same
    code (their words loaded in plane 0's shape), so one multiply-add per weight."""
    P0: tl.constexpr = 4 if BITS >= 4 else 2
    P1: tl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    S1: tl.constexpr = 4 if BITS >= 5 else 2
    P2: tl.constexpr = 1 if BITS == 7 else 0
    PER: tl.constexpr = 32 // P0
    w = tl.arange(0, P0)
    live = start + t * 32 < e  # the step's last tile can lie past the unit (and past the block)
    wmask = rmask[None, :] & live
    w0 = tl.load(qw_ptr + (W0 + t * P0 + w)[:, None].to(tl.int64) * N + rows[None, :], mask=wmask, other=0)
    if P1 > 0:  # the word of plane 1 that holds column s*P0 + w is word w % P1, at slot s*P0/P1 + w//P1
        w1 = tl.load(qw_ptr + (W0 + S1 * nt + t * P1 + w % P1)[:, None].to(tl.int64) * N + rows[None, :],
                     mask=wmask, other=0)
    if P2 > 0:  # one 1-bit word per tile: column c at bit c
        w2 = tl.load(qw_ptr + (W0 + 6 * nt + t + w * 0)[:, None].to(tl.int64) * N + rows[None, :],
                     mask=wmask, other=0)
    c0 = tl.multiple_of(start + t * 32, 32)
    for s in tl.static_range(PER):
        c = c0 + s * P0 + w  # (P0,) kernel columns of slot s: contiguous
        if GATHER:
            xv = tl.load(x_ptr + xrow + tl.load(kcol_ptr + c, mask=live, other=0).to(tl.int64), mask=live, other=0.0)
        else:
            xv = tl.load(x_ptr + xrow + c, mask=live, other=0.0)
        # masked per tile only (vector loads), then cut to the unit's columns
        xv = tl.where((c >= a) & (c < e), xv.to(tl.float32), 0.0)
        code = (w0 >> (s * P0)) & ((1 << P0) - 1)
        if P1 > 0:
            code |= ((w1 >> ((s * (P0 // P1) + w // P1) * P1)[:, None]) & ((1 << P1) - 1)) << S1
        if P2 > 0:
            code |= ((w2 >> (s * P0 + w)[:, None]) & 1) << 6
        acc += _as_float(code) * xv[:, None]
        xsum += xv
    return acc, xsum


@triton.jit
def _plane_codes(qw_ptr, N, rows, rmask, kb, e, start, base, PB: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_N) codes of one plane in column order, for the tensor-core path: row k
    reads the word holding column kb + k (several rows read one word)."""
    PER: tl.constexpr = 32 // PB
    k = tl.arange(0, BLOCK_K)
    l = k % 32
    word = base + kb // PER + (k // 32) * PB + l % PB
    words = tl.load(qw_ptr + word[:, None].to(tl.int64) * N + rows[None, :],
                    mask=(start + kb + k < e)[:, None] & rmask[None, :], other=0)
    return (words >> ((l // PB) * PB)[:, None]) & ((1 << PB) - 1)


@triton.jit
def _unit(x_ptr, kcol_ptr, qw_ptr, stride_xm, M, N, ms, mmask, rows, rmask, a, e, W0, nt, start,
          BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          USE_DOT: tl.constexpr, GATHER: tl.constexpr):
    """sum_k q x (BLOCK_M, BLOCK_N) and sum_k x (BLOCK_M,) over the unit's columns [a, e).
    Planes (module docstring): width BITS = (P0 bits at 0) [+ (P1 bits at S1)] [+ (1 bit at 6)]."""
    P0: tl.constexpr = 4 if BITS >= 4 else 2
    P1: tl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    S1: tl.constexpr = 4 if BITS >= 5 else 2
    P2: tl.constexpr = 1 if BITS == 7 else 0
    k0 = (a - start) - (a - start) % 32  # block-relative; units start anywhere, loads on the tile below
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        xs = tl.zeros((BLOCK_M,), tl.float32)
    else:  # (words of a tile, rows): reduced over the words once, after the loop
        acc2 = tl.zeros((P0, BLOCK_N), tl.float32)
        xs2 = tl.zeros((P0,), tl.float32)
    for kb in range(k0, e - start, BLOCK_K):
        kb = tl.multiple_of(kb, 32)
        if USE_DOT:
            k = start + kb + tl.arange(0, BLOCK_K)
            kmask = (k >= a) & (k < e)
            if GATHER:
                col = tl.load(kcol_ptr + k, mask=kmask, other=0).to(tl.int64)
            else:
                col = k.to(tl.int64)
            xm = tl.load(x_ptr + ms[:, None] * stride_xm + col[None, :], mask=mmask[:, None] & kmask[None, :],
                         other=0.0)  # (BLOCK_M, BLOCK_K)
            q = _plane_codes(qw_ptr, N, rows, rmask, kb, e, start, W0, P0, BLOCK_K)
            if P1 > 0:
                q |= _plane_codes(qw_ptr, N, rows, rmask, kb, e, start, W0 + S1 * nt, P1, BLOCK_K) << S1
            if P2 > 0:
                q |= _plane_codes(qw_ptr, N, rows, rmask, kb, e, start, W0 + 6 * nt, P2, BLOCK_K) << 6
            # codes <= 255 are exact in fp16 and bf16; products accumulate in fp32
            acc = tl.dot(xm, _as_float(q).to(xm.dtype), acc)
            xs += tl.sum(xm.to(tl.float32), axis=1)
        else:  # one token (ms is a scalar): CUDA-core dot products, tile by tile
            xrow = ms.to(tl.int64) * stride_xm
            for i in tl.static_range(BLOCK_K // 32):  # several tiles per step: more loads in flight
                acc2, xs2 = _tile_dot(x_ptr, kcol_ptr, qw_ptr, N, xrow, rows, rmask, kb // 32 + i, a, e, start,
                                      W0, nt, acc2, xs2, BITS, GATHER)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
        xs = tl.zeros((1,), tl.float32) + tl.sum(xs2, axis=0)
    return acc, xs


@triton.jit
def _unit_meta(unit_ptr, u, ok=True):
    """Fields a, e, bits, run, W0, nt, block start, zero stream (`_zero_points`) of unit u
    (UNIT_FIELDS int32 a unit); zeros where not ok."""
    meta = unit_ptr + u * 8  # UNIT_FIELDS (a plain literal: jit code reads no non-constexpr globals)
    return (tl.load(meta, mask=ok, other=0), tl.load(meta + 1, mask=ok, other=0), tl.load(meta + 2, mask=ok, other=0),
            tl.load(meta + 3, mask=ok, other=0), tl.load(meta + 4, mask=ok, other=0),
            tl.load(meta + 5, mask=ok, other=0), tl.load(meta + 6, mask=ok, other=0),
            tl.load(meta + 7, mask=ok, other=0))


@triton.jit
def _zero_points(zero_ptr, zs, rows, rmask):
    """int32 zero points of one run for `rows`: the run's little-endian bit stream starts at word
    zs & 0x7FFFFFF of `zero` and holds row r's zb = zs >> 27 bits at bit r * zb, possibly across
    two words (32-bit arithmetic throughout)."""
    zb = zs >> 27
    bit = rows * zb  # < 2**31 for any real height (rows * 8)
    sh = (bit & 31).to(tl.uint32)
    wp = zero_ptr + (zs & 0x7FFFFFF) + (bit >> 5)
    lo = tl.load(wp, mask=rmask, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(wp + 1, mask=rmask & ((bit & 31) + zb > 32), other=0).to(tl.uint32, bitcast=True)
    # (hi << 1) << (31 - sh): hi's bits above the sh-bit cut, no shift by 32 (hi is 0 where sh is 0)
    v = (lo >> sh) | ((hi << 1) << (31 - sh))
    return (v & ((1 << zb) - 1).to(tl.uint32)).to(tl.int32)


@triton.jit
def _run_grid(scale_ptr, zero_ptr, run, zs, N, rows, rmask, SCALE_F16: tl.constexpr):
    """fp32 scale and zero point of one run for BLOCK_N rows (scales stored as raw fp16 or fp32
    bits, zero points as the run's bit stream zs)."""
    sp = scale_ptr + run.to(tl.int64) * N + rows
    if SCALE_F16:
        s = tl.load(sp, mask=rmask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        s = tl.load(sp, mask=rmask, other=0).to(tl.float32, bitcast=True)
    return s, _zero_points(zero_ptr, zs, rows, rmask).to(tl.float32)


@triton.jit(do_not_specialize=["M", "has_bias"])  # one binary for every token count
def mixed_linear_kernel(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                        M, N, stride_xm, has_bias,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        USE_DOT: tl.constexpr, GATHER: tl.constexpr, SCALE_F16: tl.constexpr):
    """Grid (units, row tiles, token tiles). out (M, N) = x (M, K) @ W.T (+ bias)."""
    u = tl.program_id(0)
    pn = tl.program_id(1)
    pm = tl.program_id(2)
    n_units = tl.num_programs(0)
    a, e, bits, run, W0, nt, start, zs = _unit_meta(unit_ptr, u)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ms = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = ms < M
    if not USE_DOT:  # one token per program (BLOCK_M is 1)
        ms = pm
        mmask = pm < M
    # one specialised copy of the loop per width (2..8): shifts and masks are constants inside it
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    xs = tl.zeros((BLOCK_M,), tl.float32)
    for b in tl.static_range(2, 9):
        if bits == b:
            acc, xs = _unit(x_ptr, kcol_ptr, qw_ptr, stride_xm, M, N, ms, mmask, rows, rmask, a, e, W0, nt, start,
                            b, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, GATHER)

    # per (run, row) grid: y = s * (sum q x - z * sum x)
    s, z = _run_grid(scale_ptr, zero_ptr, run, zs, N, rows, rmask, SCALE_F16)
    y = s[None, :] * (acc - z[None, :] * xs[:, None])  # (BLOCK_M, BLOCK_N)

    # split-K over units: fp32 atomics into the workspace; the last program of the tile finishes
    rows2 = tl.arange(0, BLOCK_M)[:, None] * 0 + rows[None, :]
    if not USE_DOT:
        ms2 = rows2 * 0 + pm
    else:
        ms2 = ms[:, None] + rows[None, :] * 0
    omask = (ms2 < M) & (rows2 < N)
    offs = ms2.to(tl.int64) * N + rows2
    tile = pm * tl.num_programs(1) + pn
    _split_k_finish(y, offs, omask, rows2, tile, n_units, ws_ptr, cnt_ptr, bias_ptr, out_ptr, has_bias)


@triton.jit
def _store_output(y, offs, omask, rows2, tile, n_parts, ws_ptr, cnt_ptr, bias_ptr, out_ptr, has_bias,
                  ATOMIC: tl.constexpr):
    """A GEMV program's output: with one part (not ATOMIC) y plus the bias stored in the output's
    dtype, with several through `_split_k_finish`. `mixed_gemv`'s Gluon kernel calls it too."""
    if not ATOMIC:
        if has_bias:
            y += tl.load(bias_ptr + rows2, mask=omask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        _split_k_finish(y, offs, omask, rows2, tile, n_parts, ws_ptr, cnt_ptr, bias_ptr, out_ptr, has_bias)


@triton.jit
def _split_k_finish(y, offs, omask, rows2, tile, n_parts, ws_ptr, cnt_ptr, bias_ptr, out_ptr, has_bias):
    """Split-K: add the partial y into the fp32 workspace; the last of the n_parts programs of the
    output tile (a counter per tile) adds the bias, writes the output in its dtype and leaves the
    workspace and the counter zeroed for the next call. Any shape (omask's); no tensor is created
    from a shape alone, so Gluon kernels can call it too (`_store_output`)."""
    tl.atomic_add(ws_ptr + offs, y, mask=omask, sem="relaxed")
    tl.debug_barrier()  # every thread's partial is issued before the counter moves
    done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    if done == n_parts - 1:
        zeros = tl.where(omask, 0.0, 0.0)  # fp32 zeros in omask's shape (and, in Gluon, its layout)
        total = tl.atomic_add(ws_ptr + offs, zeros, mask=omask, sem="relaxed")  # read at L2, past any stale L1
        total = tl.where(omask, total, 0.0)
        tl.store(ws_ptr + offs, zeros, mask=omask)  # zeroed for the next call
        if has_bias:
            total += tl.load(bias_ptr + rows2, mask=omask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=omask)
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")  # ready for the next call


# ---------------------------------------------------------------- GEMV (one to a few tokens)
@triton.jit
def _gemv_unit(x_ptr, kcol_ptr, qw_ptr, N, stride_xm, ms, mmask, rows, rmask, a, e, W0, nt, start,
               BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TS: tl.constexpr,
               GATHER: tl.constexpr):
    """sum_k q x (BLOCK_M, BLOCK_N) and sum_k x (BLOCK_M,) over kernel columns [a, e) of one run
    in a width-BITS block, TS tiles of 32 columns a step: the step's words of every plane are
    loaded as one (TS * P0, BLOCK_N) block (rows of W contiguous: wide, coalesced loads), the
    slots are taken apart in registers and each code meets its token's x in one fp32 FMA.
    gemv_kernel's path for BLOCK_M > 1 (2-4 tokens; pick_config does not choose it: at one token it
    took 23 us against the one-token loop's 16.4 on a 4096x4096 linear, and 2-3 tokens are not timed)."""
    P0: tl.constexpr = 4 if BITS >= 4 else 2
    P1: tl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    S1: tl.constexpr = 4 if BITS >= 5 else 2
    P2: tl.constexpr = 1 if BITS == 7 else 0
    PER: tl.constexpr = 32 // P0
    J: tl.constexpr = TS * P0
    j = tl.arange(0, J)
    tj = j // P0  # tile of the step
    w = j % P0  # word of plane 0 within the tile
    acc = tl.zeros((BLOCK_M, J, BLOCK_N), tl.float32)
    xs = tl.zeros((BLOCK_M, J), tl.float32)
    t1 = (e - start + 31) // 32  # block-relative tiles [t0, t1) hold the unit
    for t0 in range((a - start) // 32, t1, TS):
        w0, w1, w2 = _step_words(qw_ptr, N, rows, rmask, W0, nt, t0, t1, BITS, TS)
        cb = start + (t0 + tj) * 32 + w
        for s in tl.static_range(PER):
            c = cb + s * P0  # (J,) kernel columns of slot s
            cm = (c >= a) & (c < e)
            if GATHER:
                col = tl.load(kcol_ptr + c, mask=cm, other=0).to(tl.int64)
            else:
                col = c.to(tl.int64)
            xv = tl.load(x_ptr + ms[:, None] * stride_xm + col[None, :], mask=mmask[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)  # (BLOCK_M, J)
            code = (w0 >> (s * P0)) & ((1 << P0) - 1)
            if P1 > 0:
                code |= ((w1 >> ((s * (P0 // P1) + w // P1) * P1)[:, None]) & ((1 << P1) - 1)) << S1
            if P2 > 0:
                code |= ((w2 >> (s * P0 + w)[:, None]) & 1) << 6
            acc += _as_float(code)[None, :, :] * xv[:, :, None]
            xs += xv
    return tl.sum(acc, axis=1), tl.sum(xs, axis=1)


@triton.jit
def _step_words(qw_ptr, N, rows, rmask, W0, nt, t0, t1, BITS: tl.constexpr, TS: tl.constexpr):
    """The words of every plane for block-relative tiles t0 .. t0 + TS (those from t1 on masked),
    each (TS * P0, BLOCK_N) in plane 0's shape: row j = tile j // P0, word j % P0 of plane 0; plane
    1's word for the same columns is w % P1 (column s*P0 + w sits at its slot s*P0/P1 + w//P1), plane
    2 (7 bits) has one 1-bit word per tile. Planes a width lacks come back as plane 0 (unused)."""
    P0: tl.constexpr = 4 if BITS >= 4 else 2
    P1: tl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    S1: tl.constexpr = 4 if BITS >= 5 else 2
    P2: tl.constexpr = 1 if BITS == 7 else 0
    j = tl.arange(0, TS * P0)
    tt = t0 + j // P0
    w = j % P0
    wmask = (tt < t1)[:, None] & rmask[None, :]
    w0 = tl.load(qw_ptr + (W0 + tt * P0 + w)[:, None].to(tl.int64) * N + rows[None, :], mask=wmask, other=0)
    w1 = w0
    w2 = w0
    if P1 > 0:
        w1 = tl.load(qw_ptr + (W0 + S1 * nt + tt * P1 + w % P1)[:, None].to(tl.int64) * N + rows[None, :],
                     mask=wmask, other=0)
    if P2 > 0:
        w2 = tl.load(qw_ptr + (W0 + 6 * nt + tt)[:, None].to(tl.int64) * N + rows[None, :], mask=wmask, other=0)
    return w0, w1, w2


@triton.jit
def _step_x(x_ptr, kcol_ptr, a, e, start, t0, C0: tl.constexpr, P0: tl.constexpr, NSL: tl.constexpr,
            TS: tl.constexpr, GATHER: tl.constexpr):
    """x (fp32) of one step at slots 0 .. NSL of every word row j (tile t0 + j // P0, word j % P0 of
    plane 0), C0 kernel columns further on: (TS * P0, NSL); columns outside [a, e) read as 0."""
    j = tl.arange(0, TS * P0)
    c = (start + (t0 + j // P0) * 32 + j % P0 + C0)[:, None] + (tl.arange(0, NSL) * P0)[None, :]  # kernel columns
    cm = (c >= a) & (c < e)
    if GATHER:
        col = tl.load(kcol_ptr + c, mask=cm, other=0).to(tl.int64)
    else:
        col = c.to(tl.int64)
    return tl.load(x_ptr + col, mask=cm, other=0.0).to(tl.float32)


@triton.jit
def _step_load1(x_ptr, kcol_ptr, qw_ptr, N, rows, rmask, a, e, W0, nt, start, t0, t1,
                BITS: tl.constexpr, TS: tl.constexpr, GATHER: tl.constexpr):
    """Everything one step of `_gemv_segment`'s one-token loop reads, issued together: `_step_words` and x at their
    columns, (TS * P0, PER) (slot s of word row j)."""
    P0: tl.constexpr = 4 if BITS >= 4 else 2
    w0, w1, w2 = _step_words(qw_ptr, N, rows, rmask, W0, nt, t0, t1, BITS, TS)
    return w0, w1, w2, _step_x(x_ptr, kcol_ptr, a, e, start, t0, 0, P0, 32 // P0, TS, GATHER)


@triton.jit
def _step_load2(x_ptr, kcol_ptr, qw_ptr, N, rows, rmask, a, e, W0, nt, start, t0, t1,
                BITS: tl.constexpr, TS: tl.constexpr, GATHER: tl.constexpr):
    """`_step_load1` for the in-place decode: x of the slots in each word's low 16 bits and of those
    in its high 16 bits, (TS * P0, PER / 2) each."""
    P0: tl.constexpr = 4 if BITS >= 4 else 2
    w0, w1, w2 = _step_words(qw_ptr, N, rows, rmask, W0, nt, t0, t1, BITS, TS)
    return (w0, w1, w2, _step_x(x_ptr, kcol_ptr, a, e, start, t0, 0, P0, 16 // P0, TS, GATHER),
            _step_x(x_ptr, kcol_ptr, a, e, start, t0, 16, P0, 16 // P0, TS, GATHER))


@triton.jit
def _pow2(k):
    """2.0 ** k as fp32 for integer -126 <= k <= 127 (built from its exponent bits)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _field_denormal(v):
    """v (int32, 0 <= v < 2**23) read as a float: the denormal v * 2**-149, exactly (no conversion
    unit, no multiply). Times x pre-scaled by `_inplace_scale` it is q x 2**-64 (`INPLACE_UNSCALE`)."""
    return v.to(tl.float32, bitcast=True)


# The in-place decode multiplies the denormal q * 2**(p - 149) of a code q at bit p by x * 2**(85 - p):
# one fused multiply-add per weight gives q x 2**-64, exact, as long as |x| < 2**42 (x * 2**85 stays finite)
# and |q x| >= 2**-62 (the product stays normal; smaller ones go gradually denormal, not to zero). A unit's
# sum is multiplied back by 2**64 once. Until 6468cdc each code was first multiplied by 2**126 (one more
# multiply per weight) and x scaled by 2**(23 - p).
INPLACE_UNSCALE = tl.constexpr(18446744073709551616.0)  # 2**64


@triton.jit
def _inplace_scale(p):
    """x's scale for a code at bit p of its word (0 <= p < 23): 2**(85 - p) (see `_field_denormal`)."""
    return _pow2(85 - p)


@triton.jit
def _inplace_dot(w0, w1, w2, x, m0, up1, m1, up2, m2, sc0, P1: tl.constexpr, P2: tl.constexpr):
    """sum over slots of code * x * 2**-64 for the slots of one 16-bit half of each word, codes decoded
    in place: plane 0's field q0 stays at its bit p of the word (mask m0), the narrower planes' bits are
    shifted left (up1, up2) to sit above it (masks m1, m2), the whole code q at bit p is read as the
    denormal q * 2**(p - 149) (`_field_denormal`) and multiplied by x * 2**(85 - p) (sc0,
    `_inplace_scale`): per weight a logic op, a shift and a logic op per further plane, and a
    multiply-add. (J, BLOCK_N)."""
    v = w0[:, None, :] & m0[None, :, None]
    if P1 > 0:
        v |= (w1[:, None, :] << up1[:, :, None]) & m1[None, :, None]
    if P2 > 0:
        v |= (w2[:, None, :] << up2[:, :, None]) & m2[None, :, None]
    return tl.sum(_field_denormal(v) * (x * sc0[None, :])[:, :, None], axis=1)


@triton.jit
def _gemv_segment(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, N, stride_xm, ms, mmask, rows, rmask, u, u1, y,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TS: tl.constexpr,
                  GATHER: tl.constexpr, SCALE_F16: tl.constexpr, ONE: tl.constexpr, INPLACE: tl.constexpr):
    """y += the units u, u + 1, ... of width BITS (up to u1 or the first unit of another width), each
    with its run's grid: y += s (sum q x - z sum x). Returns y and the first unit not done.
    One token (ONE): one software pipeline over every step of every unit of the segment: the next
    step's words and x (in the next unit when this one ends) are loaded before this step's
    arithmetic, so a unit boundary (a run, or a part of it) costs no exposed load. 2-4 tokens: the
    slot loop of `_gemv_unit`, unit by unit.
    INPLACE (one token): 1 decodes the one-plane widths (2, 4) in place (`_inplace_dot`, x loaded as
    the slots of each word's low and high 16 bits), 2 every width (the narrower planes' bits shifted
    up beside plane 0's field); 0 shifts and masks each code.
    A step is (J, PER, BLOCK_N) codes against (J, PER) x, every slot at once. History (H200, 3.5
    bits, 4096x4096): 16.4 us against 23 for the slot loop with the same prefetch, whose per-slot x
    loads sit on the critical path; loading the words in the 3D layout removed 19 of 29 layout
    conversions but no time; taking a step apart slot by slot in 2D (96-166 registers) was slower.
    Until 28f5a4b the pipeline restarted at every unit: each unit paid one exposed load, and
    the 3.5-bit 7B shapes hold 19-20 units (10 runs x 4 widths, cut at 8 parts)."""
    a, e, bits, run, W0, nt, start, zs = _unit_meta(unit_ptr, u)
    s, z = _run_grid(scale_ptr, zero_ptr, run, zs, N, rows, rmask, SCALE_F16)
    if ONE:
        na, ne, nbits, nrun, _, _, _, nzs = _unit_meta(unit_ptr, u + 1, u + 1 < u1)
        P0: tl.constexpr = 4 if BITS >= 4 else 2
        P1: tl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
        S1: tl.constexpr = 4 if BITS >= 5 else 2
        P2: tl.constexpr = 1 if BITS == 7 else 0
        PER: tl.constexpr = 32 // P0
        J: tl.constexpr = TS * P0
        w = tl.arange(0, J) % P0
        sl = tl.arange(0, PER)
        acc = tl.zeros((J, BLOCK_N), tl.float32)
        xs = tl.zeros((J,), tl.float32)
        t = (a - start) // 32  # block-relative tiles [t, t1) hold the unit
        t1 = (e - start + 31) // 32
        IP: tl.constexpr = INPLACE and (P1 == 0 or INPLACE == 2)  # 1: one-plane widths only; 2: every width
        if IP:
            # INPLACE: in each 16-bit half of a word, slot s' of plane 0 sits at bit s' * P0 (mask m0, x
            # scaled by sc0); the same column's plane-1 bits sit at p1 and move up by up1 to bit
            # s' * P0 + S1 (mask m1), its plane-2 bit (7 bits) at s' * P0 + w moves up by up2 to s' * P0 + 6
            hs = tl.arange(0, 16 // P0)
            m0 = ((1 << P0) - 1) << (hs * P0)
            sc0 = _inplace_scale(hs * P0)
            p1 = ((hs * (P0 // max(P1, 1)))[None, :] + (w // max(P1, 1))[:, None]) * P1  # (J, H)
            up1 = (hs * P0 + S1)[None, :] - p1  # >= 0
            m1 = ((1 << P1) - 1) << (hs * P0 + S1)
            up2 = 6 - w[:, None] + hs[None, :] * 0  # (J, H), >= 3
            m2 = 1 << (hs * P0 + 6)
            w0, w1, w2, xv, xh = _step_load2(x_ptr, kcol_ptr, qw_ptr, N, rows, rmask, a, e, W0, nt, start, t, t1, BITS,
                                             TS, GATHER)
        else:
            w0, w1, w2, xv = _step_load1(x_ptr, kcol_ptr, qw_ptr, N, rows, rmask, a, e, W0, nt, start, t, t1, BITS, TS,
                                         GATHER)
            xh = xv
        go = u < u1
        while go:
            ends = t + TS >= t1  # this step is the unit's last
            more = (u + 1 < u1) & (nbits == BITS)  # the segment goes on into the next unit
            # the next step: in this unit, or the next unit's first (nothing when the segment ends)
            ta = tl.where(ends, (na - start) // 32, t + TS)
            tz = tl.where(ends, tl.where(more, (ne - start + 31) // 32, ta), t1)
            a_n = tl.where(ends, na, a)
            e_n = tl.where(ends & ~more, na, tl.where(ends, ne, e))
            if IP:
                n0, n1, n2, nx, nh = _step_load2(x_ptr, kcol_ptr, qw_ptr, N, rows, rmask, a_n, e_n, W0, nt, start, ta,
                                                 tz, BITS, TS, GATHER)
                acc += _inplace_dot(w0, w1, w2, xv, m0, up1, m1, up2, m2, sc0, P1, P2)
                acc += _inplace_dot(w0 >> 16, w1 >> 16, w2 >> 16, xh, m0, up1, m1, up2, m2, sc0, P1, P2)
                xs += tl.sum(xv, axis=1) + tl.sum(xh, axis=1)
                w0, w1, w2, xv, xh = n0, n1, n2, nx, nh
            else:
                n0, n1, n2, nx = _step_load1(x_ptr, kcol_ptr, qw_ptr, N, rows, rmask, a_n, e_n, W0, nt, start, ta, tz,
                                             BITS, TS, GATHER)
                code = (w0[:, None, :] >> (sl * P0)[None, :, None]) & ((1 << P0) - 1)  # (J, PER, BLOCK_N)
                if P1 > 0:
                    sh1 = ((sl * (P0 // P1))[None, :] + (w // P1)[:, None]) * P1
                    code |= ((w1[:, None, :] >> sh1[:, :, None]) & ((1 << P1) - 1)) << S1
                if P2 > 0:
                    sh2 = (sl * P0)[None, :] + w[:, None]
                    code |= ((w2[:, None, :] >> sh2[:, :, None]) & 1) << 6
                acc += tl.sum(_as_float(code) * xv[:, :, None], axis=1)
                xs += tl.sum(xv, axis=1)
                w0, w1, w2, xv = n0, n1, n2, nx
            if ends:  # the unit's grid, once; then the next unit's fields, grid and successor
                tot = tl.sum(acc, axis=0)
                if IP:
                    tot = tot * INPLACE_UNSCALE
                y += s[None, :] * (tot[None, :] - z[None, :] * tl.sum(xs, axis=0))
                acc = tl.zeros((J, BLOCK_N), tl.float32)
                xs = tl.zeros((J,), tl.float32)
                u += 1
                a, e, run, zs = na, ne, nrun, nzs  # (W0, nt, start: a width has one block, shared)
                s, z = _run_grid(scale_ptr, zero_ptr, run, zs, N, rows, rmask & more, SCALE_F16)
                na, ne, nbits, nrun, _, _, _, nzs = _unit_meta(unit_ptr, u + 1, more & (u + 1 < u1))
                t1 = (e - start + 31) // 32
            t = ta
            go = ~ends | more
    else:
        go = u < u1
        while go:
            acc, xs = _gemv_unit(x_ptr, kcol_ptr, qw_ptr, N, stride_xm, ms, mmask, rows, rmask, a, e, W0, nt, start,
                                 BITS, BLOCK_M, BLOCK_N, TS, GATHER)
            y += s[None, :] * (acc - z[None, :] * xs[:, None])
            u += 1
            a, e, bits, run, W0, nt, start, zs = _unit_meta(unit_ptr, u, u < u1)
            go = (u < u1) & (bits == BITS)
            s, z = _run_grid(scale_ptr, zero_ptr, run, zs, N, rows, rmask & go, SCALE_F16)
    return y, u


@triton.jit
def _gemv_width(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, N, stride_xm, ms, mmask, rows, rmask, u, u1, y,
                BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TS: tl.constexpr,
                GATHER: tl.constexpr, SCALE_F16: tl.constexpr, ONE: tl.constexpr, WMASK: tl.constexpr,
                INPLACE: tl.constexpr):
    """`_gemv_segment` for width BITS if BITS is in WMASK; else the unit is skipped (that branch is
    not compiled, so the registers the kernel takes are those of the widths it serves: offline
    sm_90 compiles with Triton 3.6, the GPU box's, ptxas's counts for the former per-unit loop: 119
    for 2 or 4 bits alone, 124 for 3, 165 for 5, 128 for 2-4, 165 for 2-5, 255 and a 16-byte spill
    for all seven)."""
    if ((WMASK >> BITS) & 1) == 1:
        y, u = _gemv_segment(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, N, stride_xm, ms, mmask, rows,
                             rmask, u, u1, y, BITS, BLOCK_M, BLOCK_N, TS, GATHER, SCALE_F16, ONE, INPLACE)
    else:
        u += 1
    return y, u


@triton.jit(do_not_specialize=["M", "has_bias", "n_split"])
def gemv_kernel(x_ptr, kcol_ptr, qw_ptr, unit_ptr, uoff_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                M, N, stride_xm, has_bias, n_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TS: tl.constexpr, ATOMIC: tl.constexpr,
                GATHER: tl.constexpr, SCALE_F16: tl.constexpr, ONE: tl.constexpr, WMASK: tl.constexpr,
                INPLACE: tl.constexpr = False):
    """Grid (row tiles, parts = n_split; ATOMIC: more than one part). WMASK: bit b set for each
    width b the units hold (`MixedBitLinear.wmask`); only those widths' loops are compiled in.
    out (M, N) = x (M, K) @ W.T (+ bias) for M <= BLOCK_M tokens.
    Program (pn, ps) owns BLOCK_N rows and the units uoff[ps] .. uoff[ps + 1] (`split_units`: a
    contiguous range of kernel columns, one width each when there are several parts): it works
    through them one segment of equal width at a time (`_gemv_segment`), with the grid of each run
    applied once per unit, y += s (sum q x - z sum x), so it reads every code once for all its
    tokens. One part writes the output; more add partials through `_split_k_finish`."""
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    y = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    u = tl.load(uoff_ptr + ps)
    u1 = tl.load(uoff_ptr + ps + 1)
    while u < u1:
        bits = tl.load(unit_ptr + u * 8 + 2)
        if (bits < 2) | (bits > 8):  # a width from_parts never builds: skipped, not looped on forever
            u += 1
        for b in tl.static_range(2, 9):  # one specialised copy of the segment's loop per width
            if bits == b:
                y, u = _gemv_width(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, N, stride_xm, ms, mmask,
                                   rows, rmask, u, u1, y, b, BLOCK_M, BLOCK_N, TS, GATHER, SCALE_F16, ONE, WMASK,
                                   INPLACE)
    rows2 = ms[:, None] * 0 + rows[None, :]
    ms2 = ms[:, None] + rows[None, :] * 0
    omask = (ms2 < M) & (rows2 < N)
    offs = ms2.to(tl.int64) * N + rows2
    _store_output(y, offs, omask, rows2, pn, n_split, ws_ptr, cnt_ptr, bias_ptr, out_ptr, has_bias, ATOMIC)


# ---------------------------------------------------------------- dequantize (many tokens)
@triton.jit
def _plane_tile(qw_ptr, N, rows, rmask, base, PB: tl.constexpr, BLOCK_N: tl.constexpr):
    """(32, BLOCK_N) codes of one plane for one tile whose words start at word row `base`, in
    column order: column l = s*PB + w sits in word w at bit s*PB (`mixed_linear._pack_plane`).
    Each word is loaded once, (PB, BLOCK_N), and its slots are taken apart in registers."""
    PER: tl.constexpr = 32 // PB
    w = tl.arange(0, PB)
    words = tl.load(qw_ptr + (base + w)[:, None].to(tl.int64) * N + rows[None, :], mask=rmask[None, :], other=0)
    sh = tl.arange(0, PER) * PB
    codes = (words[None, :, :] >> sh[:, None, None]) & ((1 << PB) - 1)  # (slot, word, rows)
    return tl.reshape(codes, (32, BLOCK_N))


@triton.jit
def _tile_codes(qw_ptr, N, rows, rmask, W0, nt, tb, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(32, BLOCK_N) int32 codes of tile tb (block-relative) of a width-BITS block: the planes of
    the module docstring, plane (pb bits, off code bits below it) at word rows W0 + off*nt + tb*pb."""
    P0: tl.constexpr = 4 if BITS >= 4 else 2
    P1: tl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    S1: tl.constexpr = 4 if BITS >= 5 else 2
    P2: tl.constexpr = 1 if BITS == 7 else 0
    q = _plane_tile(qw_ptr, N, rows, rmask, W0 + tb * P0, P0, BLOCK_N)
    if P1 > 0:
        q |= _plane_tile(qw_ptr, N, rows, rmask, W0 + S1 * nt + tb * P1, P1, BLOCK_N) << S1
    if P2 > 0:
        q |= _plane_tile(qw_ptr, N, rows, rmask, W0 + 6 * nt + tb, P2, BLOCK_N) << 6
    return q


@triton.jit
def _round_bf16(w):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32, so the cast that follows is
    exact: done on the bits because Triton's interpreter truncates fp32 -> bf16 casts (the GPU's
    rounds to nearest even), and the tests compare the decode bit for bit on the CPU."""
    b = w.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def dequant_kernel(qw_ptr, tile_ptr, kr_ptr, scale_ptr, zero_ptr, out_ptr, N, K, stride_o,
                   BLOCK_N: tl.constexpr, SCALE_F16: tl.constexpr, SAVED: tl.constexpr, OUT_BF16: tl.constexpr):
    """Grid (tiles of 32 kernel columns, row tiles). out[r, k] (kernel column order) =
    fp32 scale[run(k), r] * (q[r, k] - zero[run(k), r]), rounded to the saved dtype (SAVED: 0 fp32,
    1 fp16, 2 bf16) and then to out's dtype: `MixedBitLinear.dequantize`'s arithmetic. Columns
    k >= K (the last tile's padding) are not written. kr: (runs + 1, 3) int32, the runs in kernel
    order (first column, scale/zero row, zero stream), the last row's first column past every tile;
    a tile's fields 4-7 are its first run there, that run's scale/zero row, zero stream and end
    column, so a tile of one run (most) loads its grid right after its own fields; where runs
    meet, the tile walks the further runs from the table."""
    t = tl.program_id(0)
    pn = tl.program_id(1)
    meta = tile_ptr + t * 8
    bits = tl.load(meta)
    W0 = tl.load(meta + 1)
    nt = tl.load(meta + 2)
    tb = tl.load(meta + 3)
    i = tl.load(meta + 4)  # the run (kernel order) of the tile's first column
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    q = tl.zeros((32, BLOCK_N), tl.int32)
    for b in tl.static_range(2, 9):  # one specialised copy of the decode per width
        if bits == b:
            q = _tile_codes(qw_ptr, N, rows, rmask, W0, nt, tb, b, BLOCK_N)
    k = t * 32 + tl.arange(0, 32)
    qf = q.to(tl.float32)
    # the tile's first run from its own fields (most tiles hold one run: no further load)
    s, z = _run_grid(scale_ptr, zero_ptr, tl.load(meta + 5), tl.load(meta + 6), N, rows, rmask, SCALE_F16)
    c1 = tl.load(meta + 7)
    w = s[None, :] * (qf - z[None, :])  # q - z is exact in fp32: one rounding, as in dequantize()
    if c1 < t * 32 + 32:  # runs meet in this tile: each further run gives its columns their grid
        c0 = c1
        while c0 < t * 32 + 32:
            i += 1
            c1 = tl.load(kr_ptr + i * 3 + 3)
            s, z = _run_grid(scale_ptr, zero_ptr, tl.load(kr_ptr + i * 3 + 1), tl.load(kr_ptr + i * 3 + 2), N, rows,
                             rmask, SCALE_F16)
            w = tl.where(((k >= c0) & (k < c1))[:, None], s[None, :] * (qf - z[None, :]), w)
            c0 = c1
    if SAVED == 1:
        w = w.to(tl.float16).to(tl.float32)
    elif SAVED == 2:
        w = _round_bf16(w)
    if OUT_BF16:
        w = _round_bf16(w)
    omask = (k < K)[:, None] & rmask[None, :]
    tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_o + k[:, None], w.to(out_ptr.dtype.element_ty), mask=omask)


# ---------------------------------------------------------------- launch
_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, n_out: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared fp32 accumulator (>= n_out floats) and tile counters (>= n_tiles) of a device.
    The kernel leaves both zeroed, so they are allocated (zeroed) once and only grow. Linears on
    one device must run one after another (one stream), as a model's forward does."""
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < n_out or cnt.numel() < n_tiles:
        n_out = max(n_out, 0 if ws is None else ws.numel())
        n_tiles = max(n_tiles, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(n_out, dtype=torch.float32, device=device)
        cnt = torch.zeros(n_tiles, dtype=torch.int32, device=device)
        _WORKSPACE[device] = ws, cnt
    return ws, cnt


_DENSE: dict[torch.device, torch.Tensor] = {}


def dense_workspace(device: torch.device, dtype: torch.dtype, N: int, K: int) -> torch.Tensor:
    """A (N, K) `dtype` view of the device's shared buffer for one decoded weight (the dense path),
    grown as needed: it ends as large as the largest linear run that way. The next linear's decode
    overwrites it, so (as for `workspace`) linears on one device run one after another."""
    nbytes = N * K * dtype.itemsize
    buf = _DENSE.get(device)
    if buf is None or buf.numel() < nbytes:
        _DENSE.pop(device, None)  # the old buffer goes before the larger one comes
        buf = _DENSE[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf[:nbytes].view(dtype).view(N, K)


_SAVED = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dequantize_into(out: torch.Tensor, qweight: torch.Tensor, tiles: torch.Tensor, kr: torch.Tensor,
                    scale_bits: torch.Tensor, zero: torch.Tensor, saved_dtype: torch.dtype, cfg: dict) -> torch.Tensor:
    """Decode the packed codes into out (N, K) (row stride free, columns contiguous) in kernel column
    order and out's dtype, bit for bit `MixedBitLinear.dequantize()[:, kcols[:K]]` when K is
    in_features. tiles: (n_tiles, 8) int32 bits, W0, nt, tile in block, then the first run's index,
    scale/zero row, zero stream and end column; kr: (runs + 1, 3) int32 runs in kernel order
    (`MixedBitLinear.dequant_meta`); zero: the zero-point bit streams."""
    N, K = out.shape
    if out.stride(1) != 1 or K > tiles.shape[0] * 32:
        raise ValueError(f"out {tuple(out.shape)} stride {out.stride()}: columns must be contiguous, within the tiles")
    BN = cfg.get("BLOCK_N", 32)
    grid = (triton.cdiv(K, 32), triton.cdiv(N, BN))
    with on_device(out.device):  # Triton launches on the current device, which need not be out's
        dequant_kernel[grid](qweight, tiles, kr, scale_bits, zero, out, N, K, out.stride(0),
                             BLOCK_N=BN, SCALE_F16=scale_bits.dtype == torch.int16, SAVED=_SAVED[saved_dtype],
                             OUT_BF16=out.dtype == torch.bfloat16, num_warps=cfg.get("num_warps", 2))
    return out


# from this many tokens on, a linear decodes its weight (dequant_kernel) and calls cuBLAS; below
# it runs the fused kernel. A config with DENSE=True (TUNED, or a module's `tune`) picks the former.
# 4: the dense path measured faster from 4 tokens (4, 8, 16 timed on an H200), the fused kernel at 1.
DENSE_MIN_TOKENS = 4
DENSE = dict(DENSE=True, BLOCK_N=32, num_warps=2)  # the fastest of 32/64/128 rows, 2-8 warps, on an H200

# one token: gemv_kernel, 128 rows x about 1/16 of the columns per program, 2 tiles a step: the
# fastest whole LLaMA-2-7B layer at 3.0 and 3.5 bits of BLOCK_N 64-256, TS 1-4, SPLIT 4-32, 2-8 warps
# on an H200 once a part's units share one pipeline (2026-12-01, fourth session; before, 4 tiles and 8 parts).
# INPLACE 1: widths 2 and 4 decoded where they sit (`_inplace_dot`): the 7B layer 131.3 -> 124.8 us at
# 3.5 bits, 120.5 -> 114.9 at 3.0 (bench.gemv_sweep, same run; bench/results/gemv-sweep-NVIDIA-H200-
# 2026-12-01-inplace.md). INPLACE 2 decodes every width in place, the narrower planes' bits joined
# beside plane 0's field in the integer domain (127 registers for widths 2-5, offline sm_90): 131.9 ->
# 111.7 us at 3.5 bits, 120.8 -> 108.2 at 3.0, against 125.5 / 115.3 for INPLACE 1 (same run;
# bench/results/gemv-sweep-NVIDIA-H200-2026-12-01-inplace2.md), so it is the default.
GEMV1 = dict(GEMV=True, BLOCK_M=1, BLOCK_N=128, TS=2, SPLIT=16, GATHER=True, num_warps=4, INPLACE=2)
# one token, at least twice as many rows as columns (gate/up): 256 rows a program. Timed on an H200
# with INPLACE 2 (bench.inference's per-shape trials, inference-NVIDIA-H200-2026-12-01-inplace2.json):
# 11008x4096 22.6 us against 23.6, 28672x8192 74.8 against 86.0; the square and down shapes were
# faster at 128 (4096x4096 10.9 against 11.9, 4096x11008 19.2 against 20.9), 8192x8192 about even.
# Only shapes of 4096 columns and more were timed, so the narrower ones keep GEMV1.
GEMV1_WIDE = dict(GEMV1, BLOCK_N=256)
# one token through mixed_gemv (Gluon): 256 rows a program (2 a thread), one tile a step, a ring of 3 steps
# of asynchronous copies, parts of at most 32 tiles (`MixedBitLinear.part_table(..., max_tiles=XT)`).
# pick_config takes it for 4096 columns and 4096 rows and more (see pick_config for the part counts); when it
# came in, for rows >= 2 x columns, columns >= 2 x rows and rows x columns >= 2**26: bench.inference's per-shape trials on an
# H200 at 3.5 bits (inference-NVIDIA-H200-2026-12-01-gluon.json), us, against the best gemv_kernel
# configuration: 11008x4096 19.8 (12 parts) vs 22.2, 28672x8192 67.6 vs 76.3, 8192x8192 25.7 (16) vs 28.8,
# 8192x28672 67.1 (16 parts) vs 77.7; 4096x4096 kept GEMV1 then (11.8 vs 10.8), 1024x8192 was even (12.4 vs
# 12.8) and keeps it; 4096x11008, even there (19.2 vs 19.3), runs it with 32 parts since the part
# table (group-probe-NVIDIA-H200-2026-12-02-parts.md: 17.6 against gemv_kernel's 18.5), and 4096x4096 with 32
# parts since one multiply-add a code (9.0 against 11.0, group-probe-NVIDIA-H200-2026-12-02-slotfma.md).
# TS must be 1 (mixed_gemv reads x a slot at a time).
# PK: part tables that carry their columns (x's gather one load after the program starts instead of two):
# 7B sets at 3.5 bits 76.8 -> 73.5 us summed (q/k/v 18.8 -> 18.2, o 10.3 -> 9.7, gate/up 30.7 -> 29.4, down 17.0 ->
# 16.2), at 3.0 bits 68.3 -> 68.8, within the runs' spread (group-probe-NVIDIA-H200-2026-12-02-pk.md). Where the
# inputs are fewer than 4096 the padded columns would cost up to ~5% of a linear's buffers (SmolLM2's k/v 192x576 at
# 16 parts: 5.2%, computed on the CPU): off there.
GEMV1_GLUON = dict(GEMV=True, GLUON=True, BLOCK_M=1, BLOCK_N=256, TS=1, SPLIT=16, XT=32, NS=3, GATHER=True, num_warps=4,
                   PK=True)


@functools.lru_cache(maxsize=None)
def has_gluon(device: int | None = None) -> bool:
    """Whether `mixed_gemv`'s kernel can run on CUDA device `device` (the current one when None):
    this Triton has Gluon with its asynchronous copies (Triton 3.6 tested), and the device is an
    NVIDIA GPU of compute capability 8.0 or newer (cp.async)."""
    try:
        import mixed_gemv  # noqa: F401
    except ImportError:
        return False
    if torch.version.hip or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


# gemv_gl_kernel with the widths a mixed linear compiles in (offline sm_90: widths 2-5 117 registers a thread,
# 2-8 128) x 4 warps: 4 programs an SM (a binary of one width needs fewer registers and may fit more)
GLUON_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def sm_count(device: int | None = None) -> int | None:
    """Streaming multiprocessors of CUDA device `device` (the current one when None); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device).multi_processor_count


def whole_waves(split: int, row_tiles: int, device: torch.device | None = None) -> int:
    """split, or fewer parts where row_tiles x split programs of the Gluon kernel would spill past whole
    waves (GLUON_PROGRAMS_PER_SM a multiprocessor) into a last wave under a quarter full: that wave's
    programs start when the others end and add a whole program's time. Then as many parts as fill the
    whole waves. H200 (group-probe-NVIDIA-H200-2026-12-02-shape*.md): 7B q/k/v, 48 row tiles, 12 parts =
    1.09 waves, 20.9 us at 3.5 bits, 11 parts 19.2 (18.7 in a second run), at 3.0 bits 18.8 -> 17.2;
    70B gate/up (224 row tiles, 5.09 waves) 109.1 -> 107.0, 103.7 -> 103.2."""
    sms = sm_count(None if device is None else device.index)
    if not sms:
        return split
    slots = sms * GLUON_PROGRAMS_PER_SM
    waves, rest = divmod(row_tiles * split, slots)
    if waves and 0 < rest < slots // 4:
        return max(2, waves * slots // row_tiles)
    return split


def wide_balance(N: int, K: int) -> dict:
    """{"STEP_COST": 3} (parts balanced by time, `mixed_linear.block_parts`) where rows >= 2 x inputs (gate/up),
    else {} (parts of about equal bytes). H200, 7B gate/up at 12 parts, two runs each: 3.5 bits 30.3 -> 28.7
    and 29.2 -> 27.2 us, 3.0 bits 27.5 -> 26.9 and 26.6 -> 26.4 (group-probe-NVIDIA-H200-2026-12-02-balance.md,
    -stepcost-pk.md); q/k/v and down gained nothing clear, or lost."""
    return {"STEP_COST": 3.0} if N >= 2 * K else {}


def gluon_one_token(N: int, K: int, split: int, device: torch.device | None = None) -> dict:
    """GEMV1_GLUON for N rows (a group's summed) x K inputs at about `split` parts: fewer where they would
    spill into a small last wave (`whole_waves`), part tables with their columns from 4096 inputs (PK),
    parts balanced by time where rows >= 2 x inputs (`wide_balance`). pick_config's and group_config's."""
    return dict(GEMV1_GLUON, SPLIT=whole_waves(split, triton.cdiv(N, GEMV1_GLUON["BLOCK_N"]), device), PK=K >= 4096,
                **wide_balance(N, K))


# (out, in, tokens, dtype) -> config, filled by a tuning sweep (bench/inference.py); else the rules below
TUNED: dict[tuple[int, int, int, torch.dtype], dict] = {}


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, dense: bool = True,
                device: torch.device | None = None) -> dict:
    """The path and block sizes for a call. From DENSE_MIN_TOKENS tokens (unless TUNED says
    otherwise, or dense=False asks for the fused kernel at any count, as its tests and timings do):
    DENSE=True, decode the weight then cuBLAS, with the decode's BLOCK_N and num_warps.
    Else the fused kernel's BLOCK_M (tokens per program; 1 = CUDA-core path, one token per
    program), BLOCK_N (rows), BLOCK_K (columns per step), USE_DOT (tensor cores), GATHER (x read
    through kcols inside the kernel, else gathered first), unit_k (columns per unit), num_warps.
    One token from 4096 inputs and 4096 rows (or rows x inputs >= 2**26): `mixed_gemv`'s Gluon kernel
    (GEMV1_GLUON) where `device` (the current CUDA device when None) can run it: 12 parts from twice as
    many rows as inputs, 32 from twice as many inputs as rows (the down projections; H200,
    group-probe-NVIDIA-H200-2026-12-02-parts.md: 7B down 18.5 -> 17.6 us at 3.5 bits, 70B down 61.2 ->
    58.4) or below rows x inputs 2**26 (7B o, 4096x4096: 11.0 -> 9.0 us at 3.5 bits, 9.5 -> 8.3 at 3.0,
    group-probe-NVIDIA-H200-2026-12-02-slotfma.md), else 16; fewer where they would spill into a small
    last wave (`whole_waves`); parts balanced by time where rows >= 2 x inputs (`wide_balance`)."""
    hit = TUNED.get((N, K, M, dtype))
    if hit is not None and (dense or not hit.get("DENSE")):
        return hit
    if dense and M >= DENSE_MIN_TOKENS:
        return dict(DENSE)
    if M == 1:
        down = K >= 2 * N and N >= 4096  # many inputs, few rows: more parts keep the GPU filled
        if K >= 4096 and (N >= 4096 or N * K >= 1 << 26) and has_gluon(None if device is None else device.index):
            return gluon_one_token(N, K, 12 if N >= 2 * K else (32 if down or N * K < 1 << 26 else 16), device)
        return dict(GEMV1_WIDE if N >= 2 * K and K >= 4096 else GEMV1)
    if M <= 2 or dtype == torch.float32:  # fp32 inputs never go through fp16 operands
        return dict(BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, USE_DOT=False, GATHER=True, unit_k=256, num_warps=1)
    if M <= 32:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, USE_DOT=True, GATHER=True, unit_k=512, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, USE_DOT=True, GATHER=True, unit_k=1024, num_warps=4)


def group_config(N: int, K: int, dtype: torch.dtype, device: torch.device | None = None) -> dict | None:
    """The one-token configuration for linears that read one input and run as one launch
    (`mixed_linear.SharedInputGroup`; N their summed rows, K their inputs), or None to run them one by
    one: TUNED's for (N, K, 1, dtype) if set; else the Gluon kernel where `device` can run it, 12 parts
    from N x K >= 2**25, else 16, fewer where they would spill into a small last wave (`whole_waves`); part
    tables with their columns (PK) from 4096 inputs; parts balanced by time where rows >= 2 x inputs
    (`wide_balance`). H200, `bench/group_probe.py` (group-probe-NVIDIA-H200-2026-12-01.md):
    that rule picks the faster of 12 and 16 parts for all seven sets measured (LLaMA-2-7B, 70B,
    LLaMA-3-8B, SmolLM2-135M q/k/v and gate/up), and one launch beats the linears one by one in every
    one of them, by 1.1x (70B gate/up) to 2.4x (SmolLM2 q/k/v)."""
    hit = TUNED.get((N, K, 1, dtype))
    if hit is not None:
        return hit if hit.get("GLUON") else None
    if has_gluon(None if device is None else device.index):
        return gluon_one_token(N, K, 12 if N * K >= 1 << 25 else 16, device)
    return None


def launch(x: torch.Tensor, kcols: torch.Tensor, qweight: torch.Tensor, units: torch.Tensor,
           scale_bits: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, N: int, cfg: dict,
           xg: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) in x's dtype from x (M, K) contiguous. units: (n_units, 8) int32 for cfg's unit_k.
    xg: x already gathered into kernel order (M, K_pad), used when cfg["GATHER"] is False."""
    M = x.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (units.shape[0], triton.cdiv(N, BN), triton.cdiv(M, BM))
    ws, cnt = workspace(x.device, M * N, grid[1] * grid[2])
    src = x if cfg["GATHER"] else xg
    with on_device(x.device):  # Triton launches on the current device, which need not be x's
        mixed_linear_kernel[grid](
            src, kcols, qweight, units, scale_bits, zero, bias if bias is not None else out, out, ws, cnt,
            M, N, src.stride(0), int(bias is not None),
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"], USE_DOT=cfg["USE_DOT"], GATHER=cfg["GATHER"],
            SCALE_F16=scale_bits.dtype == torch.int16, num_warps=cfg["num_warps"])
    return out


def gemv(x: torch.Tensor, kcols: torch.Tensor, qweight: torch.Tensor, units: torch.Tensor, uoff: torch.Tensor,
         scale_bits: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, N: int, cfg: dict,
         xg: torch.Tensor | None = None, wmask: int = WMASK_ALL) -> torch.Tensor:
    """out (M, N) in x's dtype from x (M, K) contiguous, M <= cfg's BLOCK_M, by `gemv_kernel`.
    wmask: bit b set for every width b among the units (`MixedBitLinear.wmask`; cfg["WMASK"], where
    given, wins); a unit of a width outside it adds nothing.
    units, uoff: `MixedBitLinear.split_units(cfg["SPLIT"])`, uoff.numel() - 1 parts (about SPLIT).
    xg: x already gathered into kernel order (M, K_pad), used when cfg["GATHER"] is False."""
    M = x.shape[0]
    if M > cfg["BLOCK_M"]:
        raise ValueError(f"{M} tokens for a GEMV configuration of BLOCK_M {cfg['BLOCK_M']}")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BN, split = cfg["BLOCK_N"], uoff.numel() - 1
    grid = (triton.cdiv(N, BN), split)
    ws, cnt = workspace(x.device, M * N, grid[0]) if split > 1 else (out, out)
    src = x if cfg["GATHER"] else xg
    with on_device(x.device):  # Triton launches on the current device, which need not be x's
        gemv_kernel[grid](
            src, kcols, qweight, units, uoff, scale_bits, zero, bias if bias is not None else out, out, ws, cnt,
            M, N, src.stride(0), int(bias is not None), split,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=BN, TS=cfg["TS"], ATOMIC=split > 1, GATHER=cfg["GATHER"],
            ONE=cfg["BLOCK_M"] == 1 and cfg.get("ONE", True),
            SCALE_F16=scale_bits.dtype == torch.int16, WMASK=cfg.get("WMASK", wmask), INPLACE=cfg.get("INPLACE", False),
            num_warps=cfg["num_warps"],
            **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return out


def gemv_launcher(cfg: dict):
    """(launcher, parts, max_tiles) of a one-token configuration: `gemv` over about SPLIT parts, or
    with GLUON `mixed_gemv.gemv_gl`, whose parts must each be one width (at least 2 parts) and at
    most XT tiles long. The parts and max_tiles are `MixedBitLinear.split_units`'s arguments."""
    if cfg.get("GLUON"):
        import mixed_gemv
        return mixed_gemv.gemv_gl, max(2, cfg["SPLIT"]), cfg["XT"]
    return gemv, cfg["SPLIT"], 0


def table_columns(cfg: dict) -> bool:
    """Whether a Gluon configuration's part tables carry their columns (`MixedBitLinear.part_table`'s
    columns): PK, where x is read through the column order (GATHER)."""
    return bool(cfg.get("PK")) and cfg["GATHER"]


# ---------------------------------------------------------------- compile ahead
def _warm_one(item: tuple[dict, str]) -> None:
    """Compile one configuration for one input dtype with a tiny launch (fills Triton's disk cache)."""
    cfg, dtype_name = item
    dev = torch.device("cuda")
    N = K = 1024  # multiples of 16, like every real shape: the same specialisation, the same binary
    zs = 4 << 27  # one run of 4 bits: its zero points a 4-bit stream at word 0
    zero = torch.zeros(N // 8, dtype=torch.int32, device=dev)
    if cfg.get("DENSE"):  # the decode, for fp16 scales and a checkpoint saved in the same dtype
        dtype = getattr(torch, dtype_name)
        tiles = torch.tensor([[4, 0, K // 32, t, 0, 0, zs, K] for t in range(K // 32)], dtype=torch.int32, device=dev)
        kr = torch.tensor([[0, 0, zs], [K, 0, 0]], dtype=torch.int32, device=dev)
        z = dict(device=dev)
        dequantize_into(torch.empty(N, K, dtype=dtype, **z), torch.zeros(4 * K // 32, N, dtype=torch.int32, **z), tiles,
                        kr, torch.zeros(1, N, dtype=torch.int16, **z), zero, dtype, cfg)
        torch.cuda.synchronize()
        return
    x = torch.randn(max(1, cfg["BLOCK_M"]), K, device=dev).to(getattr(torch, dtype_name))
    units = torch.tensor([[0, 32, 4, 0, 0, K // 32, 0, zs]], dtype=torch.int32, device=dev)
    if cfg.get("GEMV"):  # one part of one unit, the rest empty (the split-K binary)
        run, split, max_tiles = gemv_launcher(cfg)
        uoff = torch.tensor([0] + [1] * split, dtype=torch.int32, device=dev)
        if max_tiles:  # the Gluon kernel reads the parts from a part table (with their columns, as forward builds it)
            from mixed_linear import part_table_tensor
            uoff = part_table_tensor(units.tolist(), uoff.tolist(), dev,
                                     torch.zeros(K, dtype=torch.int16) if table_columns(cfg) else None)
        run(x, torch.zeros(K, dtype=torch.int16, device=dev), torch.zeros(4 * K // 32, N, dtype=torch.int32, device=dev),
            units, uoff, torch.zeros(1, N, dtype=torch.int16, device=dev), zero,
            None, N, cfg, xg=x)  # fp16 scales, as the solver saves them
        torch.cuda.synchronize()
        return
    launch(x, torch.zeros(K, dtype=torch.int16, device=dev), torch.zeros(4 * K // 32, N, dtype=torch.int32, device=dev),
           units, torch.zeros(1, N, dtype=torch.int32, device=dev), zero, None, N, cfg, xg=x)
    torch.cuda.synchronize()


def warm_up(items: list[tuple[dict, torch.dtype]], processes: int = 8) -> None:
    """Compile kernel configurations in parallel processes, so that the first calls of a run load
    binaries instead of compiling one configuration after another (~5-10 s each)."""
    import multiprocessing
    todo = {(tuple(sorted((k, v) for k, v in c.items() if k != "unit_k")), str(d).replace("torch.", ""))
            for c, d in items}
    with multiprocessing.get_context("spawn").Pool(min(processes, len(todo))) as pool:
        pool.map(_warm_one, [(dict(c), d) for c, d in todo])
