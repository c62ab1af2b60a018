"""One token on CUDA, written in Gluon (Triton's dialect with explicit layouts; Triton 3.6 tested, NVIDIA
compute capability 8.0 and newer for its asynchronous copies):
`gemv_gl_kernel`, y = x Wᵀ (+ bias) for one token straight from `mixed_linear.MixedBitLinear`'s packed
codes, with the same layout, work list and arithmetic as `mixed_kernel.gemv_kernel` with INPLACE 2
(every code decoded where it sits and read as a float, fp32 accumulation), laid out so that nothing
moves between threads inside the loop. `mixed_kernel.pick_config` chooses it at one token for the
larger shapes.

    python -m pytest -q tests_gpu/test_mixed_kernel.py -k gluon      # on a CUDA machine

Why a second kernel: `gemv_kernel` leaves layouts to Triton, which loads a step's words four rows a
thread and then moves them, and x, through shared memory into the layout of the arithmetic (7
barriers a step in the offline sm_90 SASS of its 4-bit loop). Here every layout is chosen. A step is
one tile (32 columns; the TS argument must be 1):

  L4 (1, P0, H, BLOCK_N)   P0 words of plane 0 x H slots of a 16-bit half word x rows. A thread holds
                           all of the first three and R = BLOCK_N / (32 * warps) consecutive rows;
                           lanes and warps run along the rows.
  words (1, P0, BLOCK_N)   slice 2 of L4: streamed through a ring of NS steps in shared memory by
                           asynchronous copies, each thread copying (R-wide vectors, coalesced along
                           rows) and later reading only its own rows' words.
  x                        the program stages its part's x (gathered through the column order,
                           pre-scaled for the in-place read) in shared memory once, as rows (slot,
                           word); a step reads one slot's P0 values at a time as broadcast loads.
  acc (1, P0, BLOCK_N)     slice 2 of L4: each code's product is one multiply-add into it (slot by
                           slot), summed over words (inside the thread) once a unit.

So a program (row tile, part) needs its part to be one width and at most XT tiles long
(`MixedBitLinear.part_table(..., max_tiles=XT)`). A unit's first and last steps zero the codes outside
the unit's columns [a, e) in their words (`_field_mask`); sum_k x over a unit (for the zero point) is
a reduction over the staged x at the unit's start. What a program
needs before its loop (unit range, width, block, its first two units' fields) is one row of the
part table, read at once; its first words, scales and zero points are requested before x's gather.
With PK (from 4096 inputs) the row also carries the part's original columns, requested with its fields,
so that x's gather waits on that one load (bench/NOTES.md row 43).
The split-K finish is `mixed_kernel`'s (atomics into the fp32 workspace, a counter per row tile).

Measured (H200, 2026-12-01; bench/results/gemv-sweep-NVIDIA-H200-2026-12-01-gluon.md, gemv-floor-…,
inference-…-gluon.md): on a whole 7B-shaped layer no faster than gemv_kernel (116.9 against 114.5 us at
3.5 bits), faster on the large shapes with 12-16 parts (11008x4096 19.8 against 22.2 us, 28672x8192 67.6
against 76.3, 8192x28672 67.1 against 77.7), where pick_config uses it. The ring's depth hardly matters
(3-6 steps within 3%): with the arithmetic removed a layer takes 81.6 us of 115.2, with the words' DRAM
traffic removed 104.6, with both 57.1 — launch, finish and per-step bookkeeping are half the time.

Linears that read one x (q/k/v, gate/up: `mixed_linear.SharedInputGroup`) run as one launch of this
kernel (`gemv_gl_group`, up to 3 members, each with its own codes, order, work list and grids), so they
pay the launch's fixed cost once: the 7B layer in model order 1.39x -> 1.64x of fp16 at 3.5 bits, 70B
1.72x -> 1.93x (inference-NVIDIA-H200-2026-12-01-grouped.md); every set bench/group_probe.py measured runs
faster as one launch.

One multiply-add a code into the accumulator (2026-12-02, bench/NOTES.md row 45): the products of a
step were summed over a half word's slots and then added to acc (a multiply, multiply-adds and an add
per 8 codes), and widths 3 and 5 merged their planes with two logic ops a code; now each product goes
straight into acc and those widths merge with one LOP3 a word for the even slots and one for the odd.
Offline sm_90, a step's steady path at widths 2/3/4/5: 214/299/237/331 -> 204/238/222/281 instructions.
H200: the 7B layer in model order, grouped, 71 -> 64 us of linears at 3.5 bits (2.10x of fp16),
inference-NVIDIA-H200-2026-12-02-slotfma.md.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from mixed_kernel import INPLACE_UNSCALE, _field_denormal, _inplace_scale, _pow2, _run_grid, _store_output, workspace
from parallel import on_device


@gluon.jit
def _half(w, h: gl.constexpr):
    """The word (h = 0) or its high 16 bits moved down, logically (h = 1)."""
    if h == 1:
        w = (w.to(gl.uint32, bitcast=True) >> 16).to(gl.int32, bitcast=True)
    return w


@gluon.jit
def _unit_meta(unit_ptr, u, ok):
    """Fields a, e, run, zero stream of unit u (zeros where not ok); bits, W0, nt and the block
    start are the part's, read once."""
    meta = unit_ptr + u * 8
    return (gl.load(meta, mask=ok, other=0), gl.load(meta + 1, mask=ok, other=0), gl.load(meta + 3, mask=ok, other=0),
            gl.load(meta + 7, mask=ok, other=0))


@gluon.jit
def _select(p, q, MASK: gl.constexpr, LUT: gl.constexpr):
    """(p & MASK) | (q & ~MASK) for LUT 0xE4, (p & ~MASK) | (q & MASK) for 0xD8: one LOP3 a word (written
    out, the compiler moves q's shift into the masks and splits it into two)."""
    return gl.inline_asm_elementwise(f"lop3.b32 $0, $1, $2, {MASK}, {LUT};", "=r,r,r", [p, q], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _field_mask(a, e, c0, j, F: gl.constexpr):
    """The bits of a word's F-bit fields whose columns lie in [a, e), for a word whose field at bit t
    holds kernel column c0 + t + j (j: the word's offset, a tensor or 0): every plane of every width
    is laid out so (plane 0: F = P0, j = word; one-bit planes: F = 1, j = 0; plane 1 of widths 6-8:
    F = P1, j = word % P1)."""
    lo = gl.minimum(gl.maximum(a - c0 - j, 0), 32)
    hi = gl.minimum(gl.maximum(e - c0 - j, 0), 32)
    lo = ((lo + F - 1) // F * F).to(gl.int64)
    hi = ((hi + F - 1) // F * F).to(gl.int64)
    return ((1 << hi) - (1 << lo)).to(gl.int32)  # bits [lo, hi), in 64 bits so that hi may be 32


@gluon.jit
def _step_dot(acc, w0, w1, w2, xsm2, k, BITS: gl.constexpr, R: gl.constexpr, NW: gl.constexpr):
    """acc (1, P0, BLOCK_N) += code * x over step k's words (one tile), both 16-bit halves, one slot
    of the half words at a time: per code one logic op (its field masked in place) and one
    multiply-add into acc (`mixed_kernel._inplace_dot`'s decode; x pre-scaled, read from the staged
    part as rows (slot, word) of `xsm2`). Widths whose second plane holds one bit (3, 5) merge each
    half's planes twice first, for the even and the odd slots (a slot's plane-1 bit lands on the next
    slot's field), one LOP3 a word each; widths 6-8 merge their planes per code. Codes outside the unit
    are zeroed in the words beforehand (`_field_mask`)."""
    P0: gl.constexpr = 4 if BITS >= 4 else 2
    P1: gl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    S1: gl.constexpr = 4 if BITS >= 5 else 2
    P2: gl.constexpr = 1 if BITS == 7 else 0
    H: gl.constexpr = 16 // P0
    L4: gl.constexpr = gl.BlockedLayout([1, P0, H, R], [1, 1, 1, 32], [1, 1, 1, NW], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(2, L4)
    LX: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, LW))  # (P0,): one slot's x, broadcast over the rows
    w3 = gl.expand_dims(gl.expand_dims(gl.arange(0, P0, layout=LX), 0), 2)
    up1 = S1 - (w3 // max(P1, 1)) * P1  # plane 1's bits of a column move up beside plane 0's field
    up2 = 6 - w3
    EVEN: gl.constexpr = 0x33333333 if P0 == 2 else 0x0F0F0F0F  # plane 0's fields of the even slots
    for h in gl.static_range(2):
        h0 = _half(w0, h)
        if P1 > 0:
            h1 = _half(w1, h) << up1
        if P2 > 0:
            h2 = _half(w2, h) << up2
        if P1 == 1:
            ev = _select(h0, h1, EVEN, 0xE4)
            od = _select(h0, h1, EVEN, 0xD8)
        for sl in gl.static_range(H):
            xh = gl.expand_dims(gl.expand_dims(xsm2.index((k * 2 + h) * H + sl).load(LX), 0), 2)
            if P1 == 1:
                if sl % 2 == 0:
                    v = ev & (((1 << (P0 + 1)) - 1) << (sl * P0))
                else:
                    v = od & (((1 << (P0 + 1)) - 1) << (sl * P0))
            else:
                v = h0 & (((1 << P0) - 1) << (sl * P0))
                if P1 > 0:
                    v |= h1 & (((1 << P1) - 1) << (sl * P0 + S1))
                if P2 > 0:
                    v |= h2 & (1 << (sl * P0 + 6))
            acc = acc + _field_denormal(v) * xh
    return acc


@gluon.jit
def _staged_columns(col0, BITS: gl.constexpr, XT: gl.constexpr, NW: gl.constexpr):
    """The staged part's layout: position p = (step * 2 + half) * 16 + slot * P0 + word holds kernel
    column col0 + p (the part starts at col0), so that a step's half is H rows (slot) of P0 words; its x
    is scaled by 2**(85 - slot * P0) for the in-place read (`_inplace_scale`). Returns (slot, col),
    (XT * 32,) in the staging layout."""
    P0: gl.constexpr = 4 if BITS >= 4 else 2
    H: gl.constexpr = 16 // P0
    p = _staged_offsets(XT, NW)
    return (p // P0) % H, col0 + p


@gluon.jit
def _staged_offsets(XT: gl.constexpr, NW: gl.constexpr):
    """Column (from the part's first) at each staged position p (`_staged_columns`): p itself, (XT * 32,)
    in the staging layout, the same for every width."""
    return gl.arange(0, XT * 32, layout=gl.BlockedLayout([XT // NW], [32], [NW], [0]))


@gluon.jit
def _unit_xsum(xsm, a, e, col0, BITS: gl.constexpr, XT: gl.constexpr, NW: gl.constexpr):
    """sum of x over kernel columns [a, e), from the staged part (whose first column is col0)."""
    P0: gl.constexpr = 4 if BITS >= 4 else 2
    hs, col = _staged_columns(col0, BITS, XT, NW)
    xv = xsm.load(gl.BlockedLayout([XT // NW], [32], [NW], [0])) * _pow2(hs * P0 - 85)  # undo _inplace_scale (exact)
    return gl.sum(gl.where((col >= a) & (col < e), xv, 0.0), axis=0)


@gluon.jit
def _issue(qw_ptr, N, ring0, ring1, ring2, offs0, offs1, offs2, rmask3, W0, nt, start, tile0, end, j, nsteps, ts3,
           BITS: gl.constexpr, TS: gl.constexpr, NS: gl.constexpr):
    """Start the copies of step j's words (every plane) into ring slot j % NS, one commit group
    (empty past the part's last step). Offsets in 32 bits (`gemv_gl_group` checks that they fit)."""
    P0: gl.constexpr = 4 if BITS >= 4 else 2
    P1: gl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    S1: gl.constexpr = 4 if BITS >= 5 else 2
    P2: gl.constexpr = 1 if BITS == 7 else 0
    if j < nsteps:
        t = tile0 + j * TS
        ok = (start + (t + ts3) * 32 < end) & rmask3  # (TS, 1, BLOCK_N)
        slot = j % NS
        cp.async_copy_global_to_shared(ring0.index(slot), qw_ptr + ((W0 + t * P0) * N + offs0), mask=ok)
        if P1 > 0:
            cp.async_copy_global_to_shared(ring1.index(slot), qw_ptr + ((W0 + S1 * nt + t * P1) * N + offs1),
                                           mask=ok)
        if P2 > 0:
            cp.async_copy_global_to_shared(ring2.index(slot), qw_ptr + ((W0 + 6 * nt + t) * N + offs2), mask=ok)
    cp.commit_group()


@gluon.jit
def _part(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, xsm, N, pn, u, u1, col0, W0, nt, start, end,
          a, e, run, zs, na, ne, nrun, nzs, srcs, BITS: gl.constexpr, BLOCK_N: gl.constexpr, TS: gl.constexpr,
          XT: gl.constexpr, NS: gl.constexpr, GATHER: gl.constexpr, SCALE_F16: gl.constexpr, PK: gl.constexpr):
    """y (BLOCK_N,) = sum over the part's units u .. u1 (one width BITS, one block, at most XT tiles
    from its tile-aligned first column) of s (sum q x - z sum x). The words stream through shared
    memory: a ring of NS steps filled by asynchronous copies (each thread copies and later reads
    its own rows' words), NS - 1 steps in flight ahead of the arithmetic without holding registers.
    Steps run over the part's tiles in order; a step that two units share is copied once and read
    twice. PK: srcs holds the staged positions' original columns, read beside the part table."""
    NW: gl.constexpr = gl.num_warps()
    R: gl.constexpr = BLOCK_N // (32 * NW)
    P0: gl.constexpr = 4 if BITS >= 4 else 2
    P1: gl.constexpr = 4 if BITS == 8 else (2 if (BITS == 6 or BITS == 7) else (1 if (BITS == 3 or BITS == 5) else 0))
    P2: gl.constexpr = 1 if BITS == 7 else 0
    Q1: gl.constexpr = 1 if P1 == 1 else P0  # plane 1's words a tile in the ring: one (then broadcast) or P0
    H: gl.constexpr = 16 // P0
    L4: gl.constexpr = gl.BlockedLayout([TS, P0, H, R], [1, 1, 1, 32], [1, 1, 1, NW], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(2, L4)
    LR: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, LW))
    SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    STEP: gl.constexpr = TS * 32
    gl.static_assert(TS == 1, "one tile a step (the decode reads x a slot at a time)")

    rows = pn * BLOCK_N + gl.arange(0, BLOCK_N, layout=LR)
    rmask = rows < N
    rows3 = gl.expand_dims(gl.expand_dims(rows, 0), 0)
    rmask3 = gl.expand_dims(gl.expand_dims(rmask, 0), 0)
    ts3 = gl.expand_dims(gl.expand_dims(gl.arange(0, TS, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW))), 1), 2)
    w3 = gl.expand_dims(gl.expand_dims(gl.arange(0, P0, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW))), 0), 2)
    offs0 = (ts3 * P0 + w3) * N + rows3
    if Q1 == 1:
        offs1 = ts3 * N + rows3
    else:
        offs1 = (ts3 * P1 + w3 % max(P1, 1)) * N + rows3
    offs2 = ts3 * N + rows3
    ring0 = gl.allocate_shared_memory(gl.int32, [NS, TS, P0, BLOCK_N], SL)
    ring1 = ring0
    ring2 = ring0
    if P1 > 0:
        ring1 = gl.allocate_shared_memory(gl.int32, [NS, TS, Q1, BLOCK_N], SL)
    if P2 > 0:
        ring2 = gl.allocate_shared_memory(gl.int32, [NS, TS, 1, BLOCK_N], SL)

    tile0 = (col0 - start) // 32
    nsteps = (end - col0 + STEP - 1) // STEP
    for j in gl.static_range(NS - 1):  # the first steps' words in flight before anything else
        _issue(qw_ptr, N, ring0, ring1, ring2, offs0, offs1, offs2, rmask3, W0, nt, start, tile0, end, j, nsteps, ts3,
               BITS, TS, NS)
    s, z = _run_grid(scale_ptr, zero_ptr, run, zs, N, rows, rmask, SCALE_F16)  # in flight beside x's gather

    # stage x of the part in shared memory (`_staged_columns`), gathered through the column order
    hs, col = _staged_columns(col0, BITS, XT, NW)
    ok = col < end
    if PK:
        src = srcs.to(gl.int64)
    elif GATHER:
        src = gl.load(kcol_ptr + col, mask=ok, other=0).to(gl.int64)
    else:
        src = col.to(gl.int64)
    xsm.store(gl.load(x_ptr + src, mask=ok, other=0.0).to(gl.float32) * _inplace_scale(hs * P0))
    gl.thread_barrier()
    xsm2 = xsm._reinterpret(gl.float32, [XT * 32 // P0, P0], gl.SwizzledSharedLayout(1, 1, 1, [0]))  # (slot, word)

    xs = _unit_xsum(xsm, a, e, col0, BITS, XT, NW)
    k = (a - col0) // STEP
    k1 = (e - col0 + STEP - 1) // STEP
    kiss = k + NS - 1  # the next step to copy
    acc = gl.zeros([TS, P0, BLOCK_N], gl.float32, layout=LW)
    y = gl.zeros([BLOCK_N], gl.float32, layout=LR)
    go = u < u1
    while go:
        if kiss <= k + NS - 1:  # one step's copies per new step (none when two units share this one)
            _issue(qw_ptr, N, ring0, ring1, ring2, offs0, offs1, offs2, rmask3, W0, nt, start, tile0, end, kiss, nsteps,
                   ts3, BITS, TS, NS)
            kiss += 1
        cp.wait_group(NS - 1)  # step k's copies (this thread's) have landed
        slot = k % NS
        w0 = ring0.index(slot).load(LW)
        w1 = w0
        w2 = w0
        if P1 > 0:
            w1 = ring1.index(slot).load(LW)
        if P2 > 0:
            w2 = ring2.index(slot).load(LW)
        c0 = col0 + k * STEP
        if (c0 < a) | (c0 + STEP > e):  # the step sticks out of the unit: its other codes zeroed
            w0 = w0 & _field_mask(a, e, c0, w3, P0)
            if P1 == 1:
                w1 = w1 & _field_mask(a, e, c0, 0, 1)
            elif P1 > 0:
                w1 = w1 & _field_mask(a, e, c0, w3 % max(P1, 1), P1)
            if P2 > 0:
                w2 = w2 & _field_mask(a, e, c0, 0, 1)
        acc = _step_dot(acc, w0, w1, w2, xsm2, k, BITS, R, NW)
        ends = k + 1 >= k1  # this step is the unit's last
        more = u + 1 < u1
        kn = gl.where(ends, (na - col0) // STEP, k + 1)
        if ends:  # the unit's grid, once; then the next unit's fields, grid and x sum
            y += s * (gl.sum(gl.sum(acc, axis=0), axis=0) * INPLACE_UNSCALE - z * xs)
            acc = gl.zeros([TS, P0, BLOCK_N], gl.float32, layout=LW)
            u += 1
            a, e, run, zs = na, ne, nrun, nzs
            s, z = _run_grid(scale_ptr, zero_ptr, run, zs, N, rows, rmask & more, SCALE_F16)
            xs = _unit_xsum(xsm, a, e, col0, BITS, XT, NW)
            na, ne, nrun, nzs = _unit_meta(unit_ptr, u + 1, more & (u + 1 < u1))
            k1 = (e - col0 + STEP - 1) // STEP
        k = kn
        go = ~ends | more
    cp.wait_group(0)  # no copy outlives the program
    return y


@gluon.jit
def _member(l1, l2, v0, v1, v2, NL: gl.constexpr):
    """v0, v1 or v2: the value of member 0, 1 or 2 of a group (l1: member 1 or later, l2: member 2)."""
    v = v0
    if NL > 1:
        v = gl.where(l1, v1, v)
    if NL > 2:
        v = gl.where(l2, v2, v)
    return v


@gluon.jit(do_not_specialize=["has_bias", "T1", "T2", "S0", "S1", "S2", "R1", "R2"])
def gemv_gl_kernel(x_ptr, kc0, qw0, un0, pt0, sc0, ze0, kc1, qw1, un1, pt1, sc1, ze1, kc2, qw2, un2, pt2, sc2, ze2,
                   bias_ptr, out_ptr, ws_ptr, cnt_ptr, N0, N1, N2, T1, T2, R1, R2, S0, S1, S2, W0s, W1s, W2s, has_bias,
                   NL: gl.constexpr, BLOCK_N: gl.constexpr, TS: gl.constexpr, XT: gl.constexpr, ATOMIC: gl.constexpr,
                   GATHER: gl.constexpr, SCALE_F16: gl.constexpr, WMASK: gl.constexpr, NS: gl.constexpr,
                   PK: gl.constexpr):
    """Grid (row tiles of every member, most parts of a member). out (1, N0 + ... ) = x (1, K) @ W.T
    (+ bias) for NL (1-3) linears that read the same x (`gemv_gl_group`), each with its own packed
    codes, column order, work list, part table, grids (kcI, qwI, unI, ptI, scI, zeI; NI rows, SI parts), their
    outputs side by side (member I's rows from RI; R0 = 0). Program (pn, ps): the member whose row
    tiles (from TI; T0 = 0) hold pn, BLOCK_N of its rows and its part ps (row ps of ptI,
    `MixedBitLinear.part_table`: one width, at most XT tiles; everything the program needs before
    its loop in one row, read at once; WIs int32 words a row, 16, or with PK more: the part's original
    columns follow the 16 fields, `mixed_linear.part_table_tensor`, and are read beside them, so x's
    gather waits on one load instead of two); a program past the member's parts does nothing. Only
    the widths in WMASK are compiled in. A member with one part writes its output; more add partials
    through `mixed_kernel._split_k_finish` (`_store_output`; tile counters numbered over the group)."""
    NW: gl.constexpr = gl.num_warps()
    LY: gl.constexpr = gl.BlockedLayout([BLOCK_N // (32 * NW)], [32], [NW], [0])
    pn = gl.program_id(0)
    ps = gl.program_id(1)
    l1 = pn >= T1
    l2 = pn >= T2
    n_split = _member(l1, l2, S0, S1, S2, NL)
    if ps < n_split:
        N = _member(l1, l2, N0, N1, N2, NL)
        kcol_ptr = _member(l1, l2, kc0, kc1, kc2, NL)
        qw_ptr = _member(l1, l2, qw0, qw1, qw2, NL)
        unit_ptr = _member(l1, l2, un0, un1, un2, NL)
        scale_ptr = _member(l1, l2, sc0, sc1, sc2, NL)
        zero_ptr = _member(l1, l2, ze0, ze1, ze2, NL)
        lpn = pn - _member(l1, l2, 0, T1, T2, NL)  # the row tile inside the member
        row_words = _member(l1, l2, W0s, W1s, W2s, NL)  # int32 words a row of the part table
        d = _member(l1, l2, pt0, pt1, pt2, NL) + ps * row_words  # the part's row of its member's part table
        u, u1, bits, col0, W0, nt, start, end = (gl.load(d), gl.load(d + 1), gl.load(d + 2), gl.load(d + 3),
                                                 gl.load(d + 4), gl.load(d + 5), gl.load(d + 6), gl.load(d + 7))
        a, e, run, zs = gl.load(d + 8), gl.load(d + 9), gl.load(d + 10), gl.load(d + 11)
        na, ne, nrun, nzs = gl.load(d + 12), gl.load(d + 13), gl.load(d + 14), gl.load(d + 15)
        rel = _staged_offsets(XT, NW)
        srcs = rel
        if PK:  # the staged positions' original columns, requested beside the row's fields
            cty: gl.constexpr = kcol_ptr.dtype.element_ty
            per: gl.constexpr = 32 // cty.primitive_bitwidth  # columns an int32 word
            srcs = gl.load((d + 16).to(gl.pointer_type(cty)) + rel, mask=rel < (row_words - 16) * per,
                           other=0).to(gl.int32)
        xsm = gl.allocate_shared_memory(gl.float32, [XT * 32], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        y = gl.zeros([BLOCK_N], gl.float32, layout=LY)
        for b in gl.static_range(2, 9):
            if ((WMASK >> b) & 1) == 1:
                if bits == b:
                    y += gl.convert_layout(_part(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, xsm, N, lpn,
                                                 u, u1, col0, W0, nt, start, end, a, e, run, zs, na, ne, nrun, nzs, srcs,
                                                 b, BLOCK_N, TS, XT, NS, GATHER, SCALE_F16, PK), LY)
        rows = lpn * BLOCK_N + gl.arange(0, BLOCK_N, layout=LY)
        grows = rows + _member(l1, l2, 0, R1, R2, NL)  # in the group's output
        _store_output(y, grows, rows < N, grows, pn, n_split, ws_ptr, cnt_ptr, bias_ptr, out_ptr, has_bias, ATOMIC)


def gemv_gl(x: torch.Tensor, kcols: torch.Tensor, qweight: torch.Tensor, units: torch.Tensor, parts: torch.Tensor,
            scale_bits: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, N: int, cfg: dict,
            xg: torch.Tensor | None = None, wmask: int = 0b111111100) -> torch.Tensor:
    """out (1, N) in x's dtype from x (1, K) contiguous by `gemv_gl_kernel`. units, parts:
    `MixedBitLinear.part_table(cfg["SPLIT"], device, cfg["XT"])` (parts of one width and at most XT
    tiles). xg: x gathered into kernel order, used when cfg["GATHER"] is False."""
    return gemv_gl_group(xg if not cfg["GATHER"] else x, [(kcols, qweight, units, parts, scale_bits, zero, N)], bias,
                         cfg, wmask, x_rows=x.shape[0])


def _three(values: list) -> list:
    """A group's per-member values for the kernel's three slots, the first repeated in the unused ones."""
    return values + values[:1] * (3 - len(values))


def gemv_gl_group(x: torch.Tensor, members: list[tuple], bias: torch.Tensor | None, cfg: dict,
                  wmask: int = 0b111111100, x_rows: int | None = None) -> torch.Tensor:
    """out (1, N0 + N1 + ...) in x's dtype: the products of x (1, K) contiguous with 1-3 linears that
    read it, side by side, in one launch of `gemv_gl_kernel`. members: (kcols, qweight, units, parts,
    scale_bits, zero, N) each, units and parts from `MixedBitLinear.part_table(cfg["SPLIT"], device,
    cfg["XT"])`; scale_bits of one dtype. bias: (N0 + N1 + ...,) or None. x is read through
    each member's column order (cfg["GATHER"]); for one member it may be x gathered into kernel
    order instead (GATHER False)."""
    if (x_rows or x.shape[0]) != 1:
        raise ValueError(f"{x_rows or x.shape[0]} tokens for the one-token Gluon kernel")
    if not 1 <= len(members) <= 3 or (len(members) > 1 and not cfg["GATHER"]):
        raise ValueError(f"{len(members)} linears in one launch: 1 to 3, reading x through their column orders")
    if len({m[4].dtype for m in members}) != 1:
        raise ValueError("the linears' scales differ in dtype")
    BN = cfg["BLOCK_N"]
    if BN % (32 * cfg["num_warps"]) or cfg["TS"] != 1 or cfg["XT"] % cfg["num_warps"] or cfg["NS"] < 2:
        raise ValueError(f"BLOCK_N must be a multiple of 32 x num_warps, TS 1, XT a multiple of num_warps, NS at least 2: "
                         f"{cfg}")
    if max(m[1].numel() for m in members) >= 1 << 31:  # never at LLM shapes: 405B's largest linear is < 2**29 words
        raise ValueError("packed codes of 2**31 words or more: the Gluon kernel addresses them in 32 bits")
    Ns = [m[6] for m in members]
    tiles = [triton.cdiv(n, BN) for n in Ns]
    parts = [m[3].shape[0] for m in members]
    words = [m[3].shape[1] for m in members]  # 16, or more where the rows carry their columns
    if len({w > 16 for w in words}) != 1 or any(w % 16 for w in words) or (words[0] > 16 and not cfg["GATHER"]):
        raise ValueError(f"part tables of {words} int32 words a row: all 16, or all more (multiples of 16) "
                         "and x read through the columns")
    out = torch.empty(1, sum(Ns), dtype=x.dtype, device=x.device)
    atomic = max(parts) > 1
    ws, cnt = workspace(x.device, sum(Ns), sum(tiles)) if atomic else (out, out)
    args = [t for m in _three(members) for t in m[:6]]  # unused slots: never selected
    big = 1 << 30
    T1, T2 = (tiles[0] if len(Ns) > 1 else big), (tiles[0] + tiles[1] if len(Ns) > 2 else big)
    R1, R2 = Ns[0], Ns[0] + (Ns[1] if len(Ns) > 1 else 0)
    with on_device(x.device):
        gemv_gl_kernel[(sum(tiles), max(parts))](
            x, *args, bias if bias is not None else out, out, ws, cnt, *_three(Ns), T1, T2, R1, R2, *_three(parts),
            *_three(words),
            int(bias is not None), NL=len(members), BLOCK_N=BN, TS=cfg["TS"], XT=cfg["XT"], ATOMIC=atomic,
            GATHER=cfg["GATHER"], SCALE_F16=members[0][4].dtype == torch.int16, WMASK=cfg.get("WMASK", wmask),
            NS=cfg["NS"], PK=words[0] > 16, num_warps=cfg["num_warps"],
            **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return out
