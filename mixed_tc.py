"""Experiment: one token on tensor cores, the codes of widths 2-5 decoded straight into the A operand
of `mma.sync.m16n8k16` (fp16 in, fp32 accumulation), for `mixed_gemv.gemv_gl_kernel` with TC set.

Why: the in-place fp32 decode (`mixed_kernel._inplace_dot`) costs a mask and an FFMA a weight plus
slot bookkeeping, 3-4 instructions a weight in its loop. Here two codes become two fp16 values with
one LOP3 (`(w & mask) | 0x6400` is 1024 + q·2**s exactly) and one HFMA2 (`* 2**-s - 1024·2**-s`),
and the tensor core does the multiply-adds: ~1.1 (widths 2, 4) to ~1.8 (3, 5) instructions a weight.

Result (H200, bench/tc_probe.py): exact to the same error as the current kernel (relative 2.6e-4 to
3.1e-4 against the dense decode), and no faster: the 7B layer's four launches 78.5-88 us against
79.9-83.5 (TS 1 and 2, rings of 3-8 steps, register caps 96-128). The decode's instructions were not
what bounds a step; see bench/NOTES.md.

The A operand of one mma is 16 rows x 16 columns; lane (g, t) (g = lane // 4, t = lane % 4) holds
registers r = 0..3, each two fp16 halves hf = 0, 1: row g + 8·(r % 2), column 2t + hf + 8·(r // 2).
x is the B operand (16 x 8), the same in all 8 columns, so every column of the result is y; the
accumulator keeps rows g and g + 8.

Device layout (`pack`): the same word rows as `MixedBitLinear.qweight` (a width-b block of nt
tiles holds b·nt rows of N words from W0), each tile's b rows permuted: word row W0 + t·b + w,
word P·32 + lane holds lane's codes for rows 32P .. 32P + 31 (m-tiles m = 0, 1), the tile's
columns (k-tiles kt = 0, 1), as `code_bit` places them. So a program's step is b contiguous runs
of BLOCK_N words, and a lane's b words feed its four mma (two m-tiles by two k-tiles).

`decode_program(b)` lists the decode's operations once; `ptx` writes them as the kernel's inline
assembly and `emulate` runs them on the CPU (tests/test_mixed_tc.py), so the assembly is checked
against `code_bit` without a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

TC_WIDTHS = (2, 3, 4, 5)
MAGIC = 0x64006400  # fp16 1024.0 in both halves: its 10 mantissa bits are the field


# ---------------------------------------------------------------- where each code bit lives
def _hi_shift(b: int, m: int, kt: int, r: int) -> tuple[str, int]:
    """The top bit of a width-3 or -5 code: ('shr' | 'rotr', n), the shift that brings it from the
    lane's last word to the bit above its low field."""
    if b == 3:
        return [("shr", 0), ("shr", 1), ("rotr", 8), ("rotr", 9)][2 * m + kt]
    k = 2 * (2 * m + kt) + r // 2
    return ("shr", k) if k < 4 else ("rotr", 4 + k)


def _field(b: int, r: int) -> tuple[int, int]:
    """(s, p): the low field of register r sits at bit s of each half (after the source's >> 8 for
    the second half of the fields), p bits wide."""
    if b in (2, 3):
        return 2 * r, 2
    return 4 * (r % 2), 4


def _lo_word(b: int, m: int, kt: int, r: int) -> tuple[int, bool]:
    """(word, shifted): the lane word holding register r's low fields, and whether they sit in its
    upper byte of each half (read through w >> 8)."""
    if b in (2, 3):
        return m, kt == 1
    return 2 * m + kt, r >= 2


def code_bit(b: int, m: int, kt: int, r: int, hf: int, i: int) -> tuple[int, int]:
    """(word, bit) among a lane's b words of code bit i of element (m, kt, r, hf)."""
    s, p = _field(b, r)
    if i < p:
        w, shifted = _lo_word(b, m, kt, r)
        return w, 16 * hf + s + i + (8 if shifted else 0)
    kind, n = _hi_shift(b, m, kt, r)
    pos = s + p + 16 * hf  # where the decode wants it
    return b - 1, (pos + n) % 32 if kind == "rotr" else pos + n


def element_index(m: int, kt: int, r: int, hf: int, g: np.ndarray, t: np.ndarray) -> tuple:
    """(row in the 32-row pair, column in the 32-column tile) of element (m, kt, r, hf) of lane (g, t)."""
    return 16 * m + g + 8 * (r % 2), 16 * kt + 2 * t + hf + 8 * (r // 2)


# ---------------------------------------------------------------- packing
def pack(codes: torch.Tensor, blocks: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """(R, Cp) codes in kernel column order (`MixedBitLinear.codes_kernel_order`), R a multiple of
    32, every block's width in TC_WIDTHS -> (word rows, R) int32 in the tensor-core layout."""
    R = codes.shape[0]
    if R % 32 or any(b not in TC_WIDTHS for _, _, b, _ in blocks):
        raise ValueError(f"tensor-core layout needs rows in 32s and widths {TC_WIDTHS}: {R} rows, "
                         f"widths {sorted({b for _, _, b, _ in blocks})}")
    lane = torch.arange(32, device=codes.device)
    g, t = lane // 4, lane % 4
    rows = []
    for t0, t1, b, _ in blocks:
        nt = t1 - t0
        q = codes[:, t0 * 32:t1 * 32].to(torch.int64).reshape(R // 32, 32, nt, 32).permute(0, 2, 1, 3)  # (P, tile, row, col)
        words = torch.zeros(nt, b, R // 32, 32, dtype=torch.int64, device=codes.device)  # (tile, w, P, lane)
        for m in range(2):
            for kt in range(2):
                for r in range(4):
                    for hf in range(2):
                        ri, ci = element_index(m, kt, r, hf, g, t)
                        c = q[:, :, ri, ci].permute(1, 0, 2)  # (tile, P, lane)
                        for i in range(b):
                            w, bit = code_bit(b, m, kt, r, hf, i)
                            words[:, w] |= ((c >> i) & 1) << bit
        words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
        rows.append(words.reshape(nt * b, R))
    return torch.cat(rows)


def unpack(words: torch.Tensor, blocks: list[tuple[int, int, int, int]], R: int) -> torch.Tensor:
    """Inverse of `pack`: (word rows, R) int32 -> (R, Cp) int32 codes."""
    lane = torch.arange(32, device=words.device)
    g, t = lane // 4, lane % 4
    out = torch.zeros(R, blocks[-1][1] * 32, dtype=torch.int64, device=words.device)
    for t0, t1, b, W0 in blocks:
        nt = t1 - t0
        wv = words[W0:W0 + nt * b].to(torch.int64).reshape(nt, b, R // 32, 32) & 0xFFFFFFFF
        q = torch.zeros(R // 32, nt, 32, 32, dtype=torch.int64, device=words.device)  # (P, tile, row, col)
        for m in range(2):
            for kt in range(2):
                for r in range(4):
                    for hf in range(2):
                        ri, ci = element_index(m, kt, r, hf, g, t)
                        c = torch.zeros(nt, R // 32, 32, dtype=torch.int64, device=words.device)
                        for i in range(b):
                            w, bit = code_bit(b, m, kt, r, hf, i)
                            c |= ((wv[:, w] >> bit) & 1) << i
                        q[:, :, ri, ci] = c.permute(1, 0, 2)
        out[:, t0 * 32:t1 * 32] = q.permute(0, 2, 1, 3).reshape(R, nt * 32)
    return out.to(torch.int32)


# ---------------------------------------------------------------- the decode, as a program
def decode_program(b: int) -> list[tuple]:
    """Operations that turn a lane's b words (w0 ..) into its four mma's A registers:
    ('shr' | 'rotr', dst, src, n), ('andor', dst, src, mask) = (src & mask) | MAGIC,
    ('ormask', dst, src, mask) = dst | (src & mask), ('fp16', dst, s) = dst * 2**-s - 1024 * 2**-s
    (exact: q), ('mma', m, kt, [four registers])."""
    ops, have = [], set()

    def src(name: str, kind: str, n: int) -> str:
        if n == 0:
            return name
        dst = f"{name}{kind}{n}"
        if dst not in have:
            have.add(dst)
            ops.append((kind, dst, name, n))
        return dst

    for m in range(2):
        for kt in range(2):
            regs = []
            for r in range(4):
                s, p = _field(b, r)
                w, shifted = _lo_word(b, m, kt, r)
                dst = f"a{m}{kt}{r}"
                ops.append(("andor", dst, src(f"w{w}", "shr", 8 if shifted else 0),
                            (((1 << p) - 1) << s) * 0x10001))
                if b in (3, 5):
                    kind, n = _hi_shift(b, m, kt, r)
                    ops.append(("ormask", dst, src(f"w{b - 1}", kind, n), (1 << (s + p)) * 0x10001))
                ops.append(("fp16", dst, s))
                regs.append(dst)
            ops.append(("mma", m, kt, regs))
    return ops


def _half_bits(v: float) -> int:
    return int(np.array(v, dtype=np.float16).view(np.uint16))


def ptx(b: int) -> tuple[str, str]:
    """(inline assembly, constraints) for `gl.inline_asm_elementwise`: outputs $0..$7 the new
    accumulators of m-tiles 0 and 1 (c0..c3 each: rows g, g, g + 8, g + 8; x fills every column of
    B, so c0 = c1 and c2 = c3); inputs the b words, x's four fp16 pairs (k-tile 0 columns 2t.. and
    2t + 8.., then k-tile 1) and the eight accumulators."""
    ops = decode_program(b)
    names = {f"w{i}": f"${8 + i}" for i in range(b)}
    xr = [f"${8 + b + i}" for i in range(4)]
    acc = [f"${12 + b + i}" for i in range(8)]
    temps = sorted({o[1] for o in ops if o[0] in ("shr", "rotr", "andor")})
    for i, n in enumerate(temps):
        names[n] = f"tc{i}"
    shifts = sorted({o[2] for o in ops if o[0] == "fp16"})
    L = ["{", f".reg .b32 tc<{len(temps)}>;", ".reg .b32 ks<8>, kb<8>;", ".reg .f32 td<4>;"]
    for s in shifts:
        L.append(f"mov.b32 ks{s}, {_half_bits(2.0 ** -s) * 0x10001};")
        L.append(f"mov.b32 kb{s}, {_half_bits(-1024.0 * 2.0 ** -s) * 0x10001};")
    for o in ops:
        if o[0] == "shr":
            L.append(f"shr.b32 {names[o[1]]}, {names[o[2]]}, {o[3]};")
        elif o[0] == "rotr":
            L.append(f"shf.r.wrap.b32 {names[o[1]]}, {names[o[2]]}, {names[o[2]]}, {o[3]};")
        elif o[0] == "andor":
            L.append(f"lop3.b32 {names[o[1]]}, {names[o[2]]}, {o[3]}, {MAGIC}, 0xEA;")
        elif o[0] == "ormask":
            L.append(f"lop3.b32 {names[o[1]]}, {names[o[1]]}, {names[o[2]]}, {o[3]}, 0xF8;")
        elif o[0] == "fp16":
            L.append(f"fma.rn.f16x2 {names[o[1]]}, {names[o[1]]}, ks{o[2]}, kb{o[2]};")
        else:  # mma: k-tile 0 from the accumulators in, k-tile 1 into the outputs
            _, m, kt, regs = o
            a = ", ".join(names[r] for r in regs)
            xb = f"{xr[2 * kt]}, {xr[2 * kt + 1]}"
            c = ", ".join(acc[4 * m:4 * m + 4]) if kt == 0 else "td0, td1, td2, td3"
            d = "td0, td1, td2, td3" if kt == 0 else ", ".join(f"${4 * m + i}" for i in range(4))
            L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d}}}, {{{a}}}, {{{xb}}}, {{{c}}};")
    L.append("}")
    return "\n".join(L), ",".join(["=f"] * 8 + ["r"] * (b + 4) + ["f"] * 8)


def emulate(b: int, words: np.ndarray) -> np.ndarray:
    """Run `decode_program(b)` on lane words (..., b) uint32: (..., 2 m, 2 kt, 4 r, 2 hf) fp32
    values of the A registers (the codes, if the program is right)."""
    regs = {f"w{i}": words[..., i].astype(np.uint64) for i in range(b)}
    out = np.zeros(words.shape[:-1] + (2, 2, 4, 2), dtype=np.float32)
    for o in decode_program(b):
        if o[0] == "shr":
            regs[o[1]] = regs[o[2]] >> np.uint64(o[3])
        elif o[0] == "rotr":
            v, n = regs[o[2]], np.uint64(o[3])
            regs[o[1]] = ((v >> n) | (v << np.uint64(32 - o[3]))) & np.uint64(0xFFFFFFFF)
        elif o[0] == "andor":
            regs[o[1]] = (regs[o[2]] & np.uint64(o[3])) | np.uint64(MAGIC)
        elif o[0] == "ormask":
            regs[o[1]] = regs[o[1]] | (regs[o[2]] & np.uint64(o[3]))
        elif o[0] == "fp16":
            s = o[2]
            v = regs[o[1]].astype(np.uint32)
            halves = np.stack([v & 0xFFFF, v >> 16], -1).astype(np.uint16).view(np.float16).astype(np.float32)
            f = (halves * np.float32(2.0 ** -s) + np.float32(-1024.0 * 2.0 ** -s)).astype(np.float16)
            regs[o[1]] = f  # (..., 2) fp16: exact, as the FMA's single rounding leaves it
        else:
            _, m, kt, rs = o
            for r, name in enumerate(rs):
                out[..., m, kt, r, :] = regs[name].astype(np.float32)
    return out


# ---------------------------------------------------------------- the kernel's part (Gluon)
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp  # noqa: E402

from mixed_kernel import _run_grid  # noqa: E402

_ASM2: gl.constexpr = gl.constexpr(ptx(2)[0])
_CON2: gl.constexpr = gl.constexpr(ptx(2)[1])
_ASM3: gl.constexpr = gl.constexpr(ptx(3)[0])
_CON3: gl.constexpr = gl.constexpr(ptx(3)[1])
_ASM4: gl.constexpr = gl.constexpr(ptx(4)[0])
_CON4: gl.constexpr = gl.constexpr(ptx(4)[1])
_ASM5: gl.constexpr = gl.constexpr(ptx(5)[0])
_CON5: gl.constexpr = gl.constexpr(ptx(5)[1])
F32X8: gl.constexpr = gl.constexpr((gl.float32, ) * 8)


@gluon.jit
def _issue(qw_ptr, N, ring, coffs, cok, W0, start, tile0, end, j, nsteps, BITS: gl.constexpr, TS: gl.constexpr,
           NS: gl.constexpr):
    """Start the copies of step j's TS tiles (each b word runs: one (BP, PP, 32) block, rows past b
    masked) into ring slot j % NS, one commit group (empty past the part's last step)."""
    if j < nsteps:
        for i in gl.static_range(TS):
            t = tile0 + j * TS + i
            cp.async_copy_global_to_shared(ring.index((j % NS) * TS + i), qw_ptr + (W0 + t * BITS).to(gl.int64) * N + coffs,
                                           mask=cok & (start + t * 32 < end))
    cp.commit_group()


@gluon.jit
def _step(ring, slot, x0, x1, x2, x3, c0, c1, c2, c3, c4, c5, c6, c7, BITS: gl.constexpr, E: gl.constexpr):
    """The four mma of every m-tile pair of the program for one step (32 columns)."""
    w0 = ring.index(slot).load(E)
    w1 = ring.index(slot + 1).load(E)
    if BITS == 2:
        return gl.inline_asm_elementwise(_ASM2, _CON2, [w0, w1, x0, x1, x2, x3, c0, c1, c2, c3, c4, c5, c6, c7],
                                         F32X8, True, 1)
    elif BITS == 3:
        w2 = ring.index(slot + 2).load(E)
        return gl.inline_asm_elementwise(_ASM3, _CON3, [w0, w1, w2, x0, x1, x2, x3, c0, c1, c2, c3, c4, c5, c6, c7],
                                         F32X8, True, 1)
    elif BITS == 4:
        w2 = ring.index(slot + 2).load(E)
        w3 = ring.index(slot + 3).load(E)
        return gl.inline_asm_elementwise(_ASM4, _CON4, [w0, w1, w2, w3, x0, x1, x2, x3, c0, c1, c2, c3, c4, c5, c6,
                                                        c7], F32X8, True, 1)
    else:
        w2 = ring.index(slot + 2).load(E)
        w3 = ring.index(slot + 3).load(E)
        w4 = ring.index(slot + 4).load(E)
        return gl.inline_asm_elementwise(_ASM5, _CON5, [w0, w1, w2, w3, w4, x0, x1, x2, x3, c0, c1, c2, c3, c4, c5,
                                                        c6, c7], F32X8, True, 1)


@gluon.jit
def _xpair(xsm4, k, i: gl.constexpr, t, col, a, e, bnd, LX1: gl.constexpr):
    """x pair i (0..3: k-tile 0 columns 2t.., 2t + 8.., k-tile 1 the same + 16) of step k, whose
    first kernel column is col, as (1, 1, 4) int32 (two fp16), zero outside [a, e) where bnd."""
    v = xsm4.index(k * 4 + i).load(LX1)
    if bnd:
        c = col + 8 * i + 2 * t
        v = v & (gl.where((c >= a) & (c < e), 0xFFFF, 0) | gl.where((c + 1 >= a) & (c + 1 < e), -65536, 0))
    return gl.expand_dims(gl.expand_dims(v, 0), 0)


@gluon.jit
def _xsum(xsm, a, e, col0, XT: gl.constexpr, NW: gl.constexpr):
    """sum of x over kernel columns [a, e) from the staged pairs (the part starts at col0)."""
    LS: gl.constexpr = gl.BlockedLayout([XT * 16 // (32 * NW)], [32], [NW], [0])
    c = col0 + 2 * gl.arange(0, XT * 16, layout=LS)
    v = xsm.load(LS)
    lo = v.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    hi = (v >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    return gl.sum(gl.where((c >= a) & (c < e), lo, 0.0) + gl.where((c + 1 >= a) & (c + 1 < e), hi, 0.0), axis=0)


@gluon.jit
def _grids(scale_ptr, zero_ptr, run, zs, N, r0, ok, SCALE_F16: gl.constexpr):
    """Scales and zero points of rows r0 + 8k (k = 0..3: rows g, g + 8 of m-tiles 0 and 1)."""
    s0, z0 = _run_grid(scale_ptr, zero_ptr, run, zs, N, r0, ok & (r0 < N), SCALE_F16)
    s1, z1 = _run_grid(scale_ptr, zero_ptr, run, zs, N, r0 + 8, ok & (r0 + 8 < N), SCALE_F16)
    s2, z2 = _run_grid(scale_ptr, zero_ptr, run, zs, N, r0 + 16, ok & (r0 + 16 < N), SCALE_F16)
    s3, z3 = _run_grid(scale_ptr, zero_ptr, run, zs, N, r0 + 24, ok & (r0 + 24 < N), SCALE_F16)
    return s0, z0, s1, z1, s2, z2, s3, z3


@gluon.jit
def _meta(unit_ptr, u, ok):
    meta = unit_ptr + u * 8
    return (gl.load(meta, mask=ok, other=0), gl.load(meta + 1, mask=ok, other=0), gl.load(meta + 3, mask=ok, other=0),
            gl.load(meta + 7, mask=ok, other=0))


@gluon.jit
def tc_part(x_ptr, kcol_ptr, qw_ptr, unit_ptr, scale_ptr, zero_ptr, N, pn, u, u1, col0, W0, start, end,
            a, e, run, zs, na, ne, nrun, nzs, BITS: gl.constexpr, BLOCK_N: gl.constexpr, TS: gl.constexpr,
            XT: gl.constexpr, NS: gl.constexpr, GATHER: gl.constexpr,
            SCALE_F16: gl.constexpr, LY: gl.constexpr):
    """y (BLOCK_N,) in layout LY = sum over the part's units u .. u1 (one width BITS in 2..5, one
    block, at most XT tiles from its first column) of s (sum q x - z sum x), x fp16, the words in
    the tensor-core layout (`pack`). Words stream through a ring of NS steps (asynchronous copies,
    one barrier a step: a thread reads words other threads copied); x is staged once as fp16 pairs
    in kernel column order."""
    NW: gl.constexpr = gl.num_warps()
    PP: gl.constexpr = BLOCK_N // 32
    E: gl.constexpr = gl.BlockedLayout([PP // NW, 1, 1], [1, 8, 4], [NW, 1, 1], [2, 1, 0])
    BP: gl.constexpr = 2 if BITS == 2 else (4 if BITS <= 4 else 8)
    LC: gl.constexpr = gl.BlockedLayout([1, 1, 2], [1, 2, 16], [1, NW, 1], [2, 1, 0])
    LX1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, E))
    LS: gl.constexpr = gl.BlockedLayout([XT * 16 // (32 * NW)], [32], [NW], [0])

    cp_w = gl.expand_dims(gl.expand_dims(gl.arange(0, BP, layout=gl.SliceLayout(1, gl.SliceLayout(2, LC))), 1), 2)
    cp_p = gl.expand_dims(gl.expand_dims(gl.arange(0, PP, layout=gl.SliceLayout(0, gl.SliceLayout(2, LC))), 0), 2)
    cp_l = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, LC))), 0), 1)
    prow = pn * BLOCK_N + cp_p * 32
    coffs = cp_w * N + prow + cp_l  # (BP, PP, 32)
    cok = (prow < N) & (cp_w < BITS) & (cp_l >= 0)
    STEP: gl.constexpr = 32 * TS
    ring = gl.allocate_shared_memory(gl.int32, [NS * TS, BP, PP, 32], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    ring3 = ring._reinterpret(gl.int32, [NS * TS * BP, PP, 8, 4], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    xsm = gl.allocate_shared_memory(gl.int32, [XT * 16], gl.SwizzledSharedLayout(1, 1, 1, [0]))

    tile0 = (col0 - start) // 32
    nsteps = (end - col0 + STEP - 1) // STEP
    for j in gl.static_range(NS - 1):
        _issue(qw_ptr, N, ring, coffs, cok, W0, start, tile0, end, j, nsteps, BITS, TS, NS)

    pe = gl.expand_dims(gl.expand_dims(gl.arange(0, PP, layout=gl.SliceLayout(1, gl.SliceLayout(2, E))), 1), 2)
    ge = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, E))), 0), 2)
    te = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, E))), 0), 1)
    r0 = pn * BLOCK_N + pe * 32 + ge + te * 0  # (PP, 8, 4): row g of m-tile 0 of each pair
    s0, z0, s1, z1, s2, z2, s3, z3 = _grids(scale_ptr, zero_ptr, run, zs, N, r0, u < u1, SCALE_F16)  # beside x's gather

    # x of the part as fp16 pairs in kernel column order, gathered through the column order
    c = col0 + 2 * gl.arange(0, XT * 16, layout=LS)
    ok0 = c < end
    ok1 = c + 1 < end
    if GATHER:
        src0 = gl.load(kcol_ptr + c, mask=ok0, other=0).to(gl.int64)
        src1 = gl.load(kcol_ptr + c + 1, mask=ok1, other=0).to(gl.int64)
    else:
        src0 = c.to(gl.int64)
        src1 = src0 + 1
    x0 = gl.load(x_ptr + src0, mask=ok0, other=0.0).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    x1 = gl.load(x_ptr + src1, mask=ok1, other=0.0).to(gl.int16, bitcast=True).to(gl.int32)
    xsm.store(x0 | (x1 << 16))
    gl.thread_barrier()
    xsm4 = xsm._reinterpret(gl.int32, [XT * 4, 4], gl.SwizzledSharedLayout(1, 1, 1, [0]))

    tl4 = gl.arange(0, 4, layout=LX1)
    xs = _xsum(xsm, a, e, col0, XT, NW)
    k = (a - col0) // STEP
    k1 = (e - col0 + STEP - 1) // STEP
    kiss = k + NS - 1  # the next step to copy
    zero = gl.zeros([PP, 8, 4], gl.float32, layout=E)
    c0 = zero
    c1 = zero
    c2 = zero
    c3 = zero
    c4 = zero
    c5 = zero
    c6 = zero
    c7 = zero
    y0 = zero
    y1 = zero
    y2 = zero
    y3 = zero
    go = u < u1
    while go:
        cp.wait_group(NS - 2)  # step k's copies (this thread's) have landed
        gl.thread_barrier()  # ... and every thread's; every thread is done with the slot refilled next
        if kiss <= k + NS - 1:
            _issue(qw_ptr, N, ring, coffs, cok, W0, start, tile0, end, kiss, nsteps, BITS, TS, NS)
            kiss += 1
        col = col0 + k * STEP
        bnd = (col < a) | (col + STEP > e)
        for i in gl.static_range(TS):
            kt = k * TS + i
            ct = col + 32 * i
            xq0 = _xpair(xsm4, kt, 0, tl4, ct, a, e, bnd, LX1)
            xq1 = _xpair(xsm4, kt, 1, tl4, ct, a, e, bnd, LX1)
            xq2 = _xpair(xsm4, kt, 2, tl4, ct, a, e, bnd, LX1)
            xq3 = _xpair(xsm4, kt, 3, tl4, ct, a, e, bnd, LX1)
            c0, c1, c2, c3, c4, c5, c6, c7 = _step(ring3, ((k % NS) * TS + i) * BP, xq0, xq1, xq2, xq3, c0, c1, c2, c3,
                                                   c4, c5, c6, c7, BITS, E)
        ends = k + 1 >= k1
        more = u + 1 < u1
        kn = gl.where(ends, (na - col0) // STEP, k + 1)
        if ends:  # the unit's grid, once; then the next unit's fields, grids and x sum
            y0 += s0 * (c0 - z0 * xs)  # c0 (= c1): row g of m-tile 0, c2 (= c3): row g + 8
            y1 += s1 * (c2 - z1 * xs)
            y2 += s2 * (c4 - z2 * xs)
            y3 += s3 * (c6 - z3 * xs)
            c0 = zero
            c1 = zero
            c2 = zero
            c3 = zero
            c4 = zero
            c5 = zero
            c6 = zero
            c7 = zero
            u += 1
            a, e, run, zs = na, ne, nrun, nzs
            s0, z0, s1, z1, s2, z2, s3, z3 = _grids(scale_ptr, zero_ptr, run, zs, N, r0, more, SCALE_F16)
            xs = _xsum(xsm, a, e, col0, XT, NW)
            na, ne, nrun, nzs = _meta(unit_ptr, u + 1, more & (u + 1 < u1))
            k1 = (e - col0 + STEP - 1) // STEP
        k = kn
        go = ~ends | more
    cp.wait_group(0)  # no copy outlives the program

    # every lane t holds the same sums (x fills all 8 columns of B): lane t keeps rows 32p + 8t + g
    y = gl.where(te == 0, y0, gl.where(te == 1, y1, gl.where(te == 2, y2, y3)))
    return gl.convert_layout(y.permute((0, 2, 1)).reshape([BLOCK_N]), LY)
