"""MixedBitLinear: a linear layer that runs from the packed codes of a `--save_format packed`
checkpoint, each run of input channels at its own width (2..8 bits), without a dense weight.

    import packing
    model = packing.load_packed("DIR", dtype=torch.float16, device="cuda:0", keep_packed=True)
    model.generate(...)                                  # every compressed linear is a MixedBitLinear

On CUDA the forward is one Triton kernel below `mixed_kernel.DENSE_MIN_TOKENS` tokens
(`mixed_kernel.gemv_kernel` at one token, the fused kernel at 2 and 3; `mixed_kernel.py` documents
the device layout; both are exact to the output rounding but, as measured, slower than fp16
cuBLAS), and from there `forward_dense`: the weight decoded by a Triton
kernel into a shared buffer, then cuBLAS. On the CPU,
and as the reference, it decodes the weight exactly as `packing.load_packed`'s
dense path does (fp32 `scale * (q - zero)`, cast to the saved dtype, then to `dtype`) and calls
`torch.nn.functional.linear`, so its output equals the dense model's bit for bit.

Sparsity: pruned weights are stored as their run's zero code (dense codes), which decode to 0.
At 50% sparsity that costs the full width per weight; the file's bitmask costs 1 + width/2.
"""
from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

TILE = 32  # columns per tile: a tile of any width 2..8 fills whole 32-bit words
# planes of a width: (plane bits, code bits below it): no code straddles a 32-bit word
PLANES = {2: ((2, 0),), 3: ((2, 0), (1, 2)), 4: ((4, 0),), 5: ((4, 0), (1, 4)), 6: ((4, 0), (2, 4)),
          7: ((4, 0), (2, 4), (1, 6)), 8: ((4, 0), (4, 4))}


def _pack_plane(codes: torch.Tensor, pb: int) -> torch.Tensor:
    """(R, n) codes < 2**pb, n a multiple of 32 -> (n * pb / 32, R) int32 words. Tiles of 32
    columns are slot-major: in tile t, word t*pb + w holds at bit s*pb the code of column
    32t + s*pb + w (so the columns of one slot are pb apart in each tile)."""
    R, n = codes.shape
    per = 32 // pb
    c = codes.to(torch.int64).reshape(R, n // 32, per, pb).transpose(2, 3)  # (R, tile, word, slot)
    words = (c << (torch.arange(per, dtype=torch.int64, device=c.device) * pb)).sum(3).reshape(R, -1)  # < 2**32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # as int32 bit patterns
    return words.to(torch.int32).t().contiguous()


def _unpack_plane(words: torch.Tensor, pb: int) -> torch.Tensor:
    """Inverse of `_pack_plane`: (n * pb / 32, R) int32 -> (R, n) int32 codes."""
    per = 32 // pb
    shifts = torch.arange(per, dtype=torch.int32, device=words.device) * pb
    c = (words.t()[:, :, None] >> shifts) & ((1 << pb) - 1)  # (R, tile*word, slot)
    R = words.shape[1]
    return c.reshape(R, -1, pb, per).transpose(2, 3).reshape(R, -1)


def _bit_stream(values: torch.Tensor, b: int) -> torch.Tensor:
    """Non-negative integers < 2**b -> int32 words of their little-endian bit stream (value i at
    bits [i*b, i*b + b), across word boundaries where they fall), the last word zero-padded."""
    v = values.to(torch.int64).reshape(-1)
    bits = ((v[:, None] >> torch.arange(b, device=v.device)) & 1).reshape(-1)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 32)]).reshape(-1, 32)
    words = (bits << torch.arange(32, device=v.device)).sum(1)  # < 2**32
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _from_bit_stream(words: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """The first n values of a `_bit_stream` of width b, as int32."""
    bits = ((words.to(torch.int64)[:, None] >> torch.arange(32, device=words.device)) & 1).reshape(-1)[:n * b]
    return (bits.reshape(n, b) << torch.arange(b, device=words.device)).sum(1).to(torch.int32)


def part_rows(units: list[list[int]], uoff: list[int]) -> list[list[int]]:
    """`MixedBitLinear.part_table`'s rows from a work list (rows a, e, bits, run, W0, nt, start, zs)
    and its part offsets."""
    table = []
    for u, u1 in zip(uoff, uoff[1:]):
        if u == u1:
            table.append([u, u1] + [0] * 14)
            continue
        r, nr = units[u], (units[u + 1] if u + 1 < u1 else [0] * 8)
        table.append([u, u1, r[2], r[0], r[4], r[5], r[6], units[u1 - 1][1], r[0], r[1], r[3], r[7],
                      nr[0], nr[1], nr[3], nr[7]])
    return table


def part_table_tensor(units: list[list[int]], uoff: list[int], device, kcols: torch.Tensor | None = None) -> torch.Tensor:
    """`part_rows` as an int32 tensor on `device`; with kcols (the column order, int16 or int32), each
    row followed by its part's original columns kcols[first column : end], zero-padded to L entries (L:
    the longest part, rounded up to a tile) and packed into int32 words (two int16 a word), so that a
    program reads them without first reading where its part starts. Rows are 16 + L x itemsize / 4 words,
    a multiple of 16."""
    rows = torch.tensor(part_rows(units, uoff), dtype=torch.int32).reshape(-1, 16)
    if kcols is None:
        return rows.to(device)
    col0, end = rows[:, 3].tolist(), rows[:, 7].tolist()
    L = max([TILE] + [-(-(e - c) // TILE) * TILE for c, e in zip(col0, end)])
    kc = kcols.cpu()
    cols = torch.zeros(rows.shape[0], L, dtype=kc.dtype)
    for p, (c, e) in enumerate(zip(col0, end)):
        cols[p, :max(0, e - c)] = kc[c:e]
    return torch.cat([rows, cols.view(torch.int32)], 1).to(device)


def block_parts(blocks: list, split: int, max_tiles: int = 0, step_cost: float | None = None) -> list[int]:
    """Parts per width block (t0, t1, bits, W0) for `MixedBitLinear.split_units`. step_cost None: in
    proportion to the block's bits (round(split x its share), at least one; parts of about equal
    bytes). Else balanced by time, a tile of width b costing b + step_cost: each block starts with the
    fewest parts it may have (one, or enough for parts of at most max_tiles tiles), then each further
    part goes to the block whose parts cost most, until there are split parts (or every part is one
    tile): the costliest part as cheap as it can be."""
    tiles = [t1 - t0 for t0, t1, _, _ in blocks]
    least = [max(1, -(-t // max_tiles)) if max_tiles else 1 for t in tiles]
    if step_cost is None:
        total = sum(b * t for t, (_, _, b, _) in zip(tiles, blocks))
        return [max(lo, min(t, round(split * b * t / total))) for t, lo, (_, _, b, _) in zip(tiles, least, blocks)]
    n = list(least)
    while sum(n) < split:
        grow = [i for i in range(len(n)) if n[i] < tiles[i]]
        if not grow:
            break
        # a block of t tiles in k parts: its longest part ceil(t / k) tiles
        n[max(grow, key=lambda i: -(-tiles[i] // n[i]) * (blocks[i][2] + step_cost))] += 1
    return n


def width_mask(widths) -> int:
    """Bits lo..hi set for the narrowest and widest of `widths` (gemv_kernel's WMASK)."""
    ws = list(widths)
    return sum(1 << b for b in range(min(ws), max(ws) + 1))


class MixedBitLinear(torch.nn.Module):
    """y = x Wᵀ (+ bias) with W held as bit-packed mixed-width codes (see mixed_kernel.py)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, saved_dtype: torch.dtype,
                 blocks: list[tuple[int, int, int, int]], runs: list[tuple[int, int, int, int]]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.saved_dtype = dtype, saved_dtype
        # host-side layout description (small): width blocks (tile0, tile1, bits, W0) and runs in
        # kernel order (start, end, bits, index into scale/zero); units are built from these
        self.blocks, self.kruns = blocks, runs
        self._units: dict[tuple, torch.Tensor] = {}  # work lists and tables, keyed (..., device)
        self.tune: dict | None = None  # kernel config override (mixed_kernel.pick_config's keys)
        self.group: SharedInputGroup | None = None  # linears that read the same input (`group_shared_inputs`)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_parts(cls, parts: dict, bias: torch.Tensor | None, dtype: torch.dtype, device,
                   saved_dtype: torch.dtype | None = None) -> "MixedBitLinear":
        """Repack `packing.decode_parts`' output into the device layout. saved_dtype: the dtype the
        checkpoint's dense weights had (the decode rounds through it); None means `dtype`."""
        codes, scale, zero, perm = parts["codes"], parts["scale"], parts["zero"], parts["perm"]
        runs = [tuple(int(v) for v in r) for r in parts["runs"]]
        R, C = codes.shape
        if [r[0] for r in runs] != [0] + [r[1] for r in runs[:-1]] or runs[-1][1] != C:
            raise ValueError(f"runs {runs[:3]}... do not cover the {C} columns in order")
        if not all(2 <= b <= 8 for _, _, b in runs):
            raise ValueError(f"widths {sorted({b for _, _, b in runs})} outside 2..8")
        if not (torch.equal(zero, zero.round()) and 0 <= float(zero.min()) and float(zero.max()) <= 255):
            raise ValueError("zero points are not integers in 0..255")
        # kernel order: permuted columns sorted stably by width (runs stay contiguous)
        order = sorted(range(len(runs)), key=lambda j: (runs[j][2], j))
        idx = torch.cat([torch.arange(runs[j][0], runs[j][1]) for j in order])  # kernel col -> permuted col
        kruns, k = [], 0
        for j in order:
            s, e, b = runs[j]
            kruns.append((k, k + e - s, b, j))
            k += e - s
        n_tiles = -(-C // TILE)
        Cp = n_tiles * TILE
        width = torch.zeros(Cp, dtype=torch.int64)
        for s, e, b, _ in kruns:
            width[s:e] = b
        width[C:] = width[C - 1]  # the last tile's padding takes the last width
        tile_bits = width.reshape(n_tiles, TILE).max(1).values.tolist()  # non-decreasing
        # the repacking runs on the target device (fast on a GPU for 70B-sized layers)
        qk = torch.zeros(R, Cp, dtype=torch.int32, device=device)
        qk[:, :C] = codes.to(device)[:, idx.to(device)]
        blocks, words, W0, t0 = [], [], 0, 0
        for t in range(1, n_tiles + 1):
            if t == n_tiles or tile_bits[t] != tile_bits[t0]:
                b, nt = tile_bits[t0], t - t0
                blk = qk[:, t0 * TILE:t * TILE]
                for pb, sh in PLANES[b]:  # plane with code bits [sh, sh + pb): word rows W0 + sh*nt ...
                    words.append(_pack_plane((blk >> sh) & ((1 << pb) - 1), pb))
                blocks.append((t0, t, b, W0))
                W0 += b * nt
                t0 = t
        del qk
        kcols = torch.zeros(Cp, dtype=torch.int64)
        kcols[:C] = perm.long().cpu()[idx]
        m = cls(C, R, dtype, saved_dtype or dtype, blocks, kruns)
        kdt = torch.int16 if C <= 32767 else torch.int32
        m.register_buffer("qweight", torch.cat(words))  # (total word rows, R) int32
        m.register_buffer("kcols", kcols.to(kdt).to(device))  # (Cp,) original column of kernel column k
        # fp32 scales held as raw bits so that model.half() cannot round them; fp16 where exact
        sc = scale.float().t().contiguous()  # (n_runs, R)
        if torch.equal(sc.half().float(), sc):
            m.register_buffer("scale_bits", sc.half().view(torch.int16).to(device))
        else:
            m.register_buffer("scale_bits", sc.view(torch.int32).to(device))
        # zero points as one bit stream per run at the run's width (wider only if a zero needs it), each
        # from a word boundary: m.zs[j] = its first word | its width << 27 (mixed_kernel._zero_points)
        streams, m.zs, off = [], [], 0
        for j, (_, _, b) in enumerate(runs):
            zj = zero[:, j].to(torch.int64).cpu()
            zb = max(b, int(zj.max()).bit_length())
            streams.append(_bit_stream(zj, zb))
            m.zs.append(off | zb << 27)
            off += streams[-1].numel()
        if off >= 1 << 27:
            raise ValueError(f"zero-point streams of {off} words: more than the 2**27 the layout addresses")
        m.register_buffer("zero", torch.cat(streams).to(device))
        m.register_buffer("bias", None if bias is None else bias.detach().to(dtype).to(device))
        return m

    def _work_list(self, cuts: list[int]) -> list[list[int]]:
        """Rows of a work list in kernel column order: each run's columns inside each width block,
        cut further at the kernel columns `cuts` (sorted, the last at or past every column); fields
        a, e, bits, run, W0, nt, block start, zero stream (`zs`)."""
        rows = []
        for s, e, _, j in self.kruns:
            for t0, t1, b, W0 in self.blocks:
                c, hi = max(s, t0 * TILE), min(e, t1 * TILE)
                while c < hi:
                    nxt = min(hi, cuts[bisect.bisect_right(cuts, c)])
                    rows.append([c, nxt, b, j, W0, t1 - t0, t0 * TILE, self.zs[j]])
                    c = nxt
        return rows

    def units(self, unit_k: int, device: torch.device) -> torch.Tensor:
        """(n_units, 8) int32 work list on `device` (`_work_list`): [a, e) inside one run and one
        width block, cut at multiples of unit_k."""
        key = (unit_k, device)
        if key not in self._units:
            end = self.blocks[-1][1] * TILE
            rows = self._work_list(list(range(unit_k, end + unit_k, unit_k)))
            self._units[key] = torch.tensor(rows, dtype=torch.int32, device=device)
        return self._units[key]

    def split_units(self, split: int, device: torch.device, max_tiles: int = 0,
                    step_cost: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For `mixed_kernel.gemv_kernel`: a work list of units (`_work_list`) cut into parts, and
        (parts + 1,) int32 offsets: part p is units uoff[p] .. uoff[p + 1]. split 1: one part, every
        unit. More: about `split` parts, each a tile-aligned range inside one width block, so that a
        program's units share one width (one pipelined loop over all of them); a block gets parts
        in proportion to its bits (at least one), so parts hold about equal bytes. max_tiles (with
        split > 1): no part longer than that many tiles (`mixed_gemv`, which stages a part's x in
        shared memory), a block cut into more parts where needed. Units are cut at run and part
        boundaries only. step_cost (with split > 1): parts balanced by time instead (`block_parts`)."""
        if max_tiles and split < 2:
            raise ValueError(f"max_tiles {max_tiles} needs parts of one width: split {split} < 2")
        key = ("units", split, max_tiles, step_cost, device)
        okey = ("uoff", split, max_tiles, step_cost, device)
        if key not in self._units:
            end = self.blocks[-1][1] * TILE
            cuts = {0, end}
            if split > 1:
                for (t0, t1, _, _), n in zip(self.blocks, block_parts(self.blocks, split, max_tiles, step_cost)):
                    cuts.update((t0 + (t1 - t0) * i // n) * TILE for i in range(n + 1))
            cuts = sorted(cuts)
            rows = self._work_list(cuts)
            starts = [r[0] for r in rows]  # units are in kernel column order and never cross a cut
            uoff = [bisect.bisect_left(starts, c) for c in cuts]
            self._units[key] = torch.tensor(rows, dtype=torch.int32, device=device)
            self._units[okey] = torch.tensor(uoff, dtype=torch.int32, device=device)
        return self._units[key], self._units[okey]

    def part_table(self, split: int, device: torch.device, max_tiles: int, step_cost: float | None = None,
                   columns: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """For `mixed_gemv`: `split_units`' work list and, instead of its offsets, (parts, 16) int32
        rows that hold everything a program reads before its loop, so that it reads them at once
        (one round trip to memory instead of a chain of dependent ones): first and end unit u, u1;
        then, from the units (zeros for an empty part), the width, first column, W0, nt, block
        start, the last unit's end column, the first unit's a, e, run, zero stream and the second
        unit's (zeros if none). columns: each row followed by its part's original columns
        (`part_table_tensor`), so that a program reads them beside the row instead of after it."""
        units, uoff = self.split_units(split, device, max_tiles=max_tiles, step_cost=step_cost)
        key = ("parts", split, max_tiles, step_cost, columns, device)
        if key not in self._units:
            self._units[key] = part_table_tensor(units.tolist(), uoff.tolist(), device, self.kcols if columns else None)
        return units, self._units[key]

    def one_token_lists(self, cfg: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """What a one-token configuration's launch reads (`mixed_kernel.gemv_launcher`): the work list and
        `split_units`' offsets (gemv_kernel), or `part_table`'s table, with the parts' columns where the
        configuration asks for them (`mixed_kernel.table_columns`; the Gluon kernel)."""
        import mixed_kernel
        _, split, max_tiles = mixed_kernel.gemv_launcher(cfg)
        if max_tiles:
            return self.part_table(split, device, max_tiles, cfg.get("STEP_COST"), mixed_kernel.table_columns(cfg))
        return self.split_units(split, device, step_cost=cfg.get("STEP_COST"))

    def dequant_meta(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For `mixed_kernel.dequant_kernel`: (n_tiles, 8) int32 tiles (bits, W0, nt, tile index in
        its block, then the run in kernel order of its first column and that run's scale/zero row,
        zero stream and end column) and (runs + 1, 3) int32 runs in kernel order (first column,
        scale/zero row, zero stream), closed by a row whose first column lies past every tile. A
        tile inside one run (most) needs nothing from the runs."""
        key = (-2, device)
        if key not in self._units:
            starts = [s for s, _, _, _ in self.kruns]
            n_tiles = self.blocks[-1][1]
            kr = [[s, j, self.zs[j]] for s, _, _, j in self.kruns] + [[n_tiles * TILE + TILE, 0, 0]]
            tiles = []
            for t0, t1, b, W0 in self.blocks:
                for t in range(t0, t1):
                    i = bisect.bisect_right(starts, t * TILE) - 1
                    tiles.append([b, W0, t1 - t0, t - t0, i, kr[i][1], kr[i][2], kr[i + 1][0]])
            self._units[key] = torch.tensor(tiles, dtype=torch.int32, device=device)
            self._units[(-3, device)] = torch.tensor(kr, dtype=torch.int32, device=device)
        return self._units[key], self._units[(-3, device)]

    def zero_points(self) -> torch.Tensor:
        """(n_runs, out) int32 zero points, decoded from their bit streams."""
        R, out = self.out_features, []
        for zs in self.zs:
            w0, zb = zs & (2 ** 27 - 1), zs >> 27
            out.append(_from_bit_stream(self.zero[w0:w0 + -(-R * zb // 32)], zb, R))
        return torch.stack(out)

    # ------------------------------------------------------------ decoding (reference)
    def codes_kernel_order(self) -> torch.Tensor:
        """(out, Cp) int32 codes in kernel column order, decoded from the packed words."""
        qw = self.qweight
        q = torch.zeros(self.out_features, self.blocks[-1][1] * TILE, dtype=torch.int32, device=qw.device)
        for t0, t1, b, W0 in self.blocks:
            nt = t1 - t0
            for pb, sh in PLANES[b]:
                q[:, t0 * TILE:t1 * TILE] |= _unpack_plane(qw[W0 + sh * nt:W0 + (sh + pb) * nt], pb) << sh
        return q

    def scale(self) -> torch.Tensor:
        """(n_runs, out) float32 scales."""
        sb = self.scale_bits
        return sb.view(torch.float16).float() if sb.dtype == torch.int16 else sb.view(torch.float32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) in the original column order, exactly what load_packed's dense
        path builds: fp32 scale * (q - zero), cast to the saved dtype, then to `dtype` (default: the
        module's dtype)."""
        C = self.in_features
        q = self.codes_kernel_order()[:, :C]
        col_run = torch.empty(C, dtype=torch.int64)
        for s, e, _, j in self.kruns:
            col_run[s:e] = j
        col_run = col_run.to(q.device)
        sc = self.scale()[col_run].t()  # (out, C) fp32
        z = self.zero_points()[col_run].t().float()
        Wk = sc * (q.float() - z)  # the solver's decode, in fp32
        W = torch.empty(Wk.shape, dtype=torch.float32, device=Wk.device)  # row-major, as the dense weight
        W[:, self.kcols[:C].long()] = Wk
        return W.to(self.saved_dtype).to(dtype or self.dtype)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return F.linear(x, self.dequantize(x.dtype if x.dtype != self.dtype else None),
                            None if self.bias is None else self.bias.to(x.dtype))
        import mixed_kernel
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        cfg = self.tune or mixed_kernel.pick_config(M, self.out_features, self.in_features, x.dtype, device=x.device)
        if cfg.get("DENSE"):
            return self.forward_dense(x2, cfg).reshape(*shape[:-1], self.out_features)
        xg = None if cfg["GATHER"] else x2.index_select(1, self.kcols.int())
        bias = None if self.bias is None else self.bias
        if cfg.get("GEMV"):  # one token: gemv_kernel, or mixed_gemv's Gluon kernel
            if self.group is not None and self.tune is None:  # one launch for the linears that share x
                out = self.group.output(self, x, x2)
                if out is not None:
                    return out.reshape(*shape[:-1], self.out_features)
            run = mixed_kernel.gemv_launcher(cfg)[0]
            units, uoff = self.one_token_lists(cfg, x.device)
            out = run(x2, self.kcols, self.qweight, units, uoff, self.scale_bits, self.zero, bias, self.out_features, cfg,
                      xg, self.wmask)
            return out.reshape(*shape[:-1], self.out_features)
        out = mixed_kernel.launch(x2, self.kcols, self.qweight, self.units(cfg["unit_k"], x.device),
                                  self.scale_bits, self.zero, bias, self.out_features, cfg, xg)
        return out.reshape(*shape[:-1], self.out_features)

    def forward_dense(self, x: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
        """The many-token path: x (M, in) gathered into kernel column order once, the weight decoded
        by `mixed_kernel.dequant_kernel` into the device's shared (out, in) buffer in x's dtype
        (bit for bit `dequantize(x.dtype)` with its columns in kernel order), then cuBLAS."""
        import mixed_kernel
        K, dev = self.in_features, x.device
        # (M, K) kernel order; padding columns never used. kcols is int16 for models up to 32767 inputs and
        # index_select takes no int16: a transient int32 copy, rather than a second one kept beside it
        xg = x.index_select(1, self.kcols[:K].int())
        tiles, kr = self.dequant_meta(dev)
        Wk = mixed_kernel.dense_workspace(dev, x.dtype, self.out_features, K)
        mixed_kernel.dequantize_into(Wk, self.qweight, tiles, kr, self.scale_bits, self.zero, self.saved_dtype,
                                     cfg or mixed_kernel.DENSE)
        return F.linear(xg, Wk, None if self.bias is None else self.bias.to(x.dtype))

    # ------------------------------------------------------------ reporting
    def packed_bytes(self) -> int:
        """Bytes this module holds on its device (codes, scales, zeros, column order, bias, work lists)."""
        n = sum(b.numel() * b.element_size() for b in self.buffers())
        dev = self.qweight.device
        return n + sum(u.numel() * u.element_size() for key, u in self._units.items() if key[-1] == dev)

    @property
    def wmask(self) -> int:
        """Bits lo..hi set, lo and hi the narrowest and widest width of the packed codes: gemv_kernel
        compiles only those widths' loops (fewer registers: on an H200 at one token, 11008x4096 at
        3.5 bits took 31.8 us against 37.8 with all seven). A range, not the exact set, so that a
        model's linears share a few binaries (each new one compiles for seconds)."""
        return width_mask(b for _, _, b, _ in self.blocks)

    def widths(self) -> dict[int, int]:
        """{width: input channels}."""
        out: dict[int, int] = {}
        for s, e, b, _ in self.kruns:
            out[b] = out.get(b, 0) + e - s
        return dict(sorted(out.items()))

    def extra_repr(self) -> str:
        avg = sum(b * n for b, n in self.widths().items()) / self.in_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"runs={len(self.kruns)}, widths={self.widths()}, avg_bits={avg:.3f}, "
                f"bytes={self.packed_bytes()}")


class SharedInputGroup:
    """2-3 `MixedBitLinear`s of one layer that read the same input (q/k/v of attention, gate/up of the
    MLP): at one token on CUDA the first of them called with an input x runs all of them in one
    launch (`mixed_gemv.gemv_gl_group`: one grid over every member's row tiles and parts, where the
    launches one by one each pay their own fixed cost), keeps the others' outputs and hands each over
    when that member is called with the same x; a member called with anything else (another tensor,
    or x changed in place since) runs the group again. Used where `mixed_kernel.group_config` gives
    the Gluon kernel for the group's summed rows (or `tune`, a config for the group, says so); else,
    and at other token counts, the members run one by one. A member's own `tune` takes it out of the group.

    The group keeps a reference to the last x and its outputs until the next launch (one token's worth).
    Under torch.inference_mode a tensor has no version counter: x is then matched by identity only."""

    def __init__(self, members: list[MixedBitLinear]):
        why = self.incompatible(members)
        if why:
            raise ValueError(f"these linears cannot run as one group: {why}")
        self.members = list(members)
        self.out_features = sum(m.out_features for m in members)  # the launch's rows, members side by side
        self._bounds = [0]
        for m in members:
            self._bounds.append(self._bounds[-1] + m.out_features)
        self._wmask = width_mask(b for m in members for _, _, b, _ in m.blocks)  # the range of every member's widths
        self.tune: dict | None = None
        self._x, self._version, self._pending = None, None, {}
        self._bias: tuple | None = None
        for m in members:
            m.group = self

    @staticmethod
    def incompatible(members: list[MixedBitLinear]) -> str:
        """Why `members` cannot share a launch ('' if they can)."""
        if not 2 <= len(members) <= 3:
            return f"{len(members)} linears (2 or 3 share a launch)"
        first = members[0]
        for m in members[1:]:
            if m.in_features != first.in_features:
                return f"inputs of {first.in_features} and {m.in_features} features"
            if m.qweight.device != first.qweight.device:
                return f"devices {first.qweight.device} and {m.qweight.device}"
            if m.scale_bits.dtype != first.scale_bits.dtype or m.kcols.dtype != first.kcols.dtype:
                return "scales or column orders stored in different dtypes"
            if (m.bias is None) != (first.bias is None):
                return "some have a bias and some not"
        return ""

    def _group_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The members' biases side by side in `dtype` (built once, again if a bias tensor changed)."""
        if self.members[0].bias is None:
            return None
        key = (dtype,) + tuple((m.bias.data_ptr(), m.bias.device, _version(m.bias)) for m in self.members)
        if self._bias is None or self._bias[0] != key:
            self._bias = key, torch.cat([m.bias.to(dtype) for m in self.members])
        return self._bias[1]

    def output(self, member: MixedBitLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """member's output (1, out) for input x (x2: x as (1, in) with unit stride), from the group's
        last launch if that read this x, else from a new one; None if the group does not run here."""
        import mixed_kernel
        if x2.shape[0] != 1:
            return None
        version = _version(x)
        if x is self._x and version == self._version and member in self._pending:
            out = self._pending.pop(member)
            if not self._pending:
                self._x = None
            return out
        cfg = self.tune or mixed_kernel.group_config(self.out_features, member.in_features, x.dtype, device=x.device)
        if cfg is None or not cfg.get("GLUON"):
            return None
        outs = self.launch(x2, cfg)
        self._x, self._version = x, version
        self._pending = {m: o for m, o in zip(self.members, outs) if m is not member}
        return outs[self.members.index(member)]

    def launch(self, x2: torch.Tensor, cfg: dict) -> list[torch.Tensor]:
        """Every member's output for x2 (1, in), in one launch of `mixed_gemv.gemv_gl_group`: views
        (1, out) into one (1, sum of outs) tensor."""
        import mixed_gemv
        members = []
        for m in self.members:
            units, parts = m.one_token_lists(cfg, x2.device)
            members.append((m.kcols, m.qweight, units, parts, m.scale_bits, m.zero, m.out_features))
        out = mixed_gemv.gemv_gl_group(x2, members, self._group_bias(x2.dtype), cfg, self._wmask)
        return [out[:, a:b] for a, b in zip(self._bounds, self._bounds[1:])]


def _version(t: torch.Tensor) -> int | None:
    """t's version counter (bumped by every in-place change), None for an inference tensor (it has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling linears that read one input


def group_shared_inputs(model: torch.nn.Module) -> int:
    """Put the `MixedBitLinear` siblings of `model` that read the same input (`SHARED_INPUTS`: q/k/v of
    an attention block, gate/up of an MLP, LLaMA-family names) into `SharedInputGroup`s; siblings that
    cannot share a launch (`SharedInputGroup.incompatible`) stay alone. Returns the number of groups."""
    n = 0
    for mod in model.modules():
        for names in SHARED_INPUTS:
            ms = [getattr(mod, a, None) for a in names]
            if all(isinstance(m, MixedBitLinear) for m in ms) and not SharedInputGroup.incompatible(ms):
                SharedInputGroup(ms)
                n += 1
    return n
