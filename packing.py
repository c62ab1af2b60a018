"""Deployable outputs: the packed checkpoint (`--save_format packed`), its loader, and a
GPTQ-layout copy where the quantization allows one.

    python -c "import packing; m = packing.load_packed('DIR')"

A packed save holds (in packed.safetensors, or, as the CLI writes it, in the shards
packed-000KK-of-000NN.safetensors listed by packed.safetensors.index.json), for every
quantized linear P (e.g. model.layers.0.self_attn.q_proj):
  P.codes  uint8   the integer codes, one little-endian bit stream per run, each run at its
                   own width (2..8) and starting on a byte boundary; value i of a stream
                   occupies bits [i*b, (i+1)*b), bit k of a byte is (byte >> k) & 1
  P.scale  float16 (out, n_runs) grid step per output row and run (the solver fits it in fp16)
  P.zero   uint8   the integer zero points, one bit stream per run at the run's width holding
                   its out values, each starting on a byte boundary
  P.perm   uint8   bit stream of the solver column order at ceil(log2 in) bits per index, only
                   when it is not the identity: column k of the permuted order is original
                   column perm[k]
  P.mask   uint8   bit stream of the (out, in) keep-mask in permuted order (mode "bitmask"), or
  P.nm     uint8   bit stream of one index per row and M consecutive *original* columns: the
                   rank of its set of M-N kept positions among all such sets in lexicographic
                   order, ceil(log2 C(M, M-N)) bits each (3 bits per 4 weights at 2:4) (mode "nm")
and every other tensor (embeddings, norms, biases, lm_head, unquantized linears) as it was.
Codes are stored for the kept positions only ("bitmask"/"nm") or for all positions ("dense"),
row-major within a run. The safetensors metadata key "packing" (sharded: the index's metadata
key "packing") holds the JSON header
(per linear: shape, runs [start, end, bits] over permuted columns, mask mode, byte counts).
Every byte of a linear is counted in advance by `linear_nbytes`, so the compression report's
stored bits are the file's (`stored_bytes`). Format version 1 (fp32 scales, uint8 zeros of
shape (out, n_runs), int16/int32 permutation) is still read.

Decoding is exact: the weight is scale * (q - zero) computed in fp32 and cast to the saved
dtype, the same operations the solver used, so the rebuilt model equals the dense save bit
for bit.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import torch

PACKED_FILE = "packed.safetensors"
FORMAT_VERSION = 2
_CHUNK = 8 * 65536  # values per packing step: a multiple of 8, so every step ends on a byte boundary


# ---------------------------------------------------------------- bit streams
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit stream of non-negative integers < 2^bits (any shape, row-major) as uint8."""
    v = values.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32)
    out = []
    for c0 in range(0, v.numel(), _CHUNK):
        b = ((v[c0:c0 + _CHUNK, None] >> shifts) & 1).reshape(-1)  # (n * bits,)
        pad = (-b.numel()) % 8
        if pad:
            b = torch.cat([b, b.new_zeros(pad)])
        out.append((b.reshape(-1, 8) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n values of a stream written by `pack_bits`, as int32."""
    shifts = torch.arange(8, dtype=torch.int32)
    weights = 1 << torch.arange(bits, dtype=torch.int32)
    out = []
    per = _CHUNK * bits // 8  # bytes per step
    for c0 in range(0, n, _CHUNK):
        cn = min(_CHUNK, n - c0)
        d = data[c0 // _CHUNK * per:][:math.ceil(cn * bits / 8)].to(torch.int32)
        b = ((d[:, None] >> shifts) & 1).reshape(-1)[:cn * bits].reshape(cn, bits)
        out.append((b * weights).sum(1, dtype=torch.int32))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int32)


# ---------------------------------------------------------------- N:M index code
def _nm_tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Kept-slot sets of M - N out of M positions, ranked lexicographically: rank -> bool (M,)
    pattern, pattern-as-integer -> rank, and the width of a rank."""
    combos = list(itertools.combinations(range(m), m - n))
    patterns = torch.zeros(len(combos), m, dtype=torch.bool)
    lookup = torch.full((1 << m,), -1, dtype=torch.int32)
    for r, c in enumerate(combos):
        patterns[r, list(c)] = True
        lookup[sum(1 << i for i in c)] = r
    return patterns, lookup, max(1, math.ceil(math.log2(len(combos))))


def _nm_slots(nonzero: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """Kept slots (R, C): per M consecutive columns exactly M - N of them, holding every nonzero
    weight (padded with the first zero positions). None where some group has more nonzeros."""
    R, C = nonzero.shape
    if C % m:
        return None
    g = nonzero.reshape(R, C // m, m)
    if int(g.sum(2).max()) > m - n:
        return None
    pos = torch.arange(m)
    key = g.to(torch.int64) * m + (m - 1 - pos)  # nonzeros first, then by position
    idx = torch.topk(key, m - n, dim=2).indices
    return torch.zeros_like(g).scatter_(2, idx, True).reshape(R, C)


def _nm_encode(slots: torch.Tensor, n: int, m: int) -> torch.Tensor:
    _, lookup, width = _nm_tables(n, m)
    R, C = slots.shape
    as_int = (slots.reshape(R, C // m, m).to(torch.int64) << torch.arange(m)).sum(2)
    return pack_bits(lookup[as_int], width)


def _nm_decode(data: torch.Tensor, n: int, m: int, R: int, C: int) -> torch.Tensor:
    patterns, _, width = _nm_tables(n, m)
    ranks = unpack_bits(data, width, R * (C // m)).long()
    return patterns[ranks].reshape(R, C)


# ---------------------------------------------------------------- one linear
def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (to compare bit for bit, -0.0 included)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _decode_run(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale * (q - zero) in fp32: exactly the solver's dequantization."""
    return scale.float() * (q.float() - zero.float())


def codes_of(W: torch.Tensor, qparams: dict) -> torch.Tensor | None:
    """Integer codes (out, in) in permuted column order such that decoding reproduces W (in its
    dtype) bit for bit; None where some weight is off the grid."""
    perm = qparams["perm"].long().cpu()
    scale, zero = qparams["scale"].float().cpu(), qparams["zero"].float().cpu()
    Wp = W.cpu()[:, perm]  # (R, C) permuted, model dtype
    q = torch.empty(Wp.shape, dtype=torch.int32)
    for j, (s, e, b) in enumerate(qparams["runs"]):
        if b > 8:
            return None
        sc, z, maxq = scale[:, j:j + 1], zero[:, j:j + 1], 2 ** b - 1
        if not (torch.equal(z, z.round()) and 0 <= float(z.min()) and float(z.max()) <= maxq):
            return None
        target = _bits_of(Wp[:, s:e])
        qj = (torch.round(Wp[:, s:e].float() / sc) + z).clamp(0, maxq)
        ok = _bits_of(_decode_run(qj, sc, z).to(W.dtype)) == target
        for step in (-1, 1):  # a low-precision dtype can round W/scale to a neighbour code
            if bool(ok.all()):
                break
            cand = (qj + step).clamp(0, maxq)
            hit = ~ok & (_bits_of(_decode_run(cand, sc, z).to(W.dtype)) == target)
            qj = torch.where(hit, cand, qj)
            ok |= hit
        if not bool(ok.all()):
            return None
        q[:, s:e] = qj.to(torch.int32)
    return q


def perm_width(C: int) -> int:
    """Bits per stored column index."""
    return max(1, math.ceil(math.log2(C)))


def _layout(nonzero: torch.Tensor, runs: list, perm: torch.Tensor, nm: tuple[int, int]
            ) -> tuple[str, torch.Tensor | None]:
    """How a linear's codes are stored, from its nonzero pattern (out, in) in permuted order:
    ("nm", slots) where an N:M pattern holds on consecutive original columns (what sparse
    kernels read), ("bitmask", kept) where a 1-bit mask costs less than the zero codes it
    removes, else ("dense", None). slots/kept: (out, in) bool, permuted order."""
    R, C = nonzero.shape
    if nm[1]:
        nonzero_orig = torch.empty_like(nonzero)
        nonzero_orig[:, perm] = nonzero
        slots_orig = _nm_slots(nonzero_orig, *nm)
        if slots_orig is not None:
            return "nm", slots_orig[:, perm]
    saved = sum(int((~nonzero[:, s:e]).sum()) * b for s, e, b in runs)
    if saved > R * C:
        return "bitmask", nonzero
    return "dense", None


def linear_nbytes(R: int, C: int, runs: list, counts: list[int], mode: str, nm: tuple[int, int],
                  permuted: bool) -> dict[str, int]:
    """Bytes of each tensor a packed linear (out R, in C) holds: codes (counts[j] values of run
    j at its width), fp16 scales, zero points at the run widths, the permutation and the
    sparsity encoding."""
    nbytes = {"codes": sum(math.ceil(n * b / 8) for n, (_, _, b) in zip(counts, runs)),
              "scale": 2 * R * len(runs), "zero": sum(math.ceil(R * b / 8) for _, _, b in runs),
              "perm": math.ceil(C * perm_width(C) / 8) if permuted else 0,
              "mask": math.ceil(R * C / 8) if mode == "bitmask" else 0,
              "nm": math.ceil(R * (C // nm[1]) * _nm_tables(*nm)[2] / 8) if mode == "nm" else 0}
    nbytes["total"] = sum(nbytes.values())
    return nbytes


def fixed_bits(R: int, C: int, mode: str, nm: tuple[int, int], n_runs: int, permuted: bool = True) -> int:
    """Bits a packed linear holds besides its runs' codes, scales and zeros: the permutation,
    the sparsity encoding, and up to 7 bits of byte padding per stream (the bound the bit
    allocation plans with)."""
    n = linear_nbytes(R, C, [(0, C, 1)] * 0, [], mode, nm, permuted)
    return 8 * (n["perm"] + n["mask"] + n["nm"]) + 7 * (2 * n_runs + 2)


def run_row_bits(kept: int, bits: int) -> int:
    """Bits one output row of a run costs: its kept codes, its fp16 scale and its zero point."""
    return kept * bits + 16 + bits


def stored_bytes(W: torch.Tensor, qparams: dict, nm: tuple[int, int] = (0, 0)) -> dict[str, int]:
    """What pack_linear will write for the quantized weight W (out, in): linear_nbytes of its
    layout. A weight is stored as a code unless its layout drops it, and a code equals the
    zero point exactly where the weight is 0."""
    dev = W.device if not nm[1] else torch.device("cpu")  # the N:M layout is worked out on the CPU
    perm = qparams["perm"].long().to(dev)
    R, C = W.shape
    runs = [tuple(int(x) for x in r) for r in qparams["runs"]]
    nonzero = W.to(dev)[:, perm] != 0
    mode, slots = _layout(nonzero, runs, perm, nm)
    counts = [R * (e - s) if slots is None else int(slots[:, s:e].sum()) for s, e, _ in runs]
    return linear_nbytes(R, C, runs, counts, mode, nm, not torch.equal(perm, torch.arange(C, device=dev)))


def pack_linear(W: torch.Tensor, qparams: dict, nm: tuple[int, int] = (0, 0)
                ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Tensors (names relative to the linear) and the header entry of one quantized weight
    (out, in); None where it cannot be packed exactly (it is then stored dense)."""
    q = codes_of(W, qparams)
    if q is None:
        return None
    R, C = q.shape
    runs = [tuple(int(x) for x in r) for r in qparams["runs"]]
    perm = qparams["perm"].long().cpu()
    zero = qparams["zero"].cpu().to(torch.int32)  # (R, n_runs)
    nonzero = q != zero.repeat_interleave(torch.tensor([e - s for s, e, _ in runs]), dim=1)  # (R, C): weight != 0
    mode, slots = _layout(nonzero, runs, perm, nm)
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {"shape": [R, C], "runs": [list(r) for r in runs], "mask": mode}
    if mode == "nm":
        info["nm"] = list(nm)
        slots_orig = torch.empty_like(slots)
        slots_orig[:, perm] = slots
        tensors["nm"] = _nm_encode(slots_orig, *nm)
    elif mode == "bitmask":
        tensors["mask"] = pack_bits(slots, 1)
    streams = [pack_bits(q[:, s:e] if slots is None else q[:, s:e][slots[:, s:e]], b) for s, e, b in runs]
    info["code_bytes"] = [int(x.numel()) for x in streams]
    tensors["codes"] = torch.cat(streams)
    tensors["scale"] = qparams["scale"].to(torch.float16).cpu().contiguous()
    zeros = [pack_bits(zero[:, j], b) for j, (_, _, b) in enumerate(runs)]
    info["zero_bytes"] = [int(x.numel()) for x in zeros]
    tensors["zero"] = torch.cat(zeros)
    info["perm"] = not torch.equal(perm, torch.arange(C))
    if info["perm"]:
        tensors["perm"] = pack_bits(perm, perm_width(C))
    return tensors, info


def decode_parts(tensors: dict[str, torch.Tensor], info: dict, version: int = FORMAT_VERSION) -> dict:
    """The integer content of one packed linear, before dequantization:
    codes (out, in) int32 in permuted column order (pruned positions hold their run's zero
    point, which decodes to +0.0), keep (out, in) bool in permuted order or None (no sparsity
    encoding), scale (out, n_runs) and zero (out, n_runs) as float32, perm (in,) int64 (column k
    of the permuted order is original column perm[k]) and runs [(start, end, bits)] over
    permuted columns. Dequantized, run j's columns are scale[:, j] * (codes - zero[:, j]).
    version: the file's format version (1 stored fp32 scales, an (out, n_runs) uint8 zero
    tensor and an int16/int32 permutation)."""
    R, C = info["shape"]
    runs = [tuple(int(x) for x in r) for r in info["runs"]]
    scale = tensors["scale"].float()
    if version < 2:
        zero = tensors["zero"].float()
        perm = tensors["perm"].long() if info.get("perm") else torch.arange(C)
    else:
        zero = torch.empty(R, len(runs))
        off = 0
        for j, ((_, _, b), nbytes) in enumerate(zip(runs, info["zero_bytes"])):
            zero[:, j] = unpack_bits(tensors["zero"][off:off + nbytes], b, R).float()
            off += nbytes
        perm = unpack_bits(tensors["perm"], perm_width(C), C).long() if info.get("perm") else torch.arange(C)
    keep = None
    if info["mask"] == "bitmask":
        keep = unpack_bits(tensors["mask"], 1, R * C).bool().reshape(R, C)
    elif info["mask"] == "nm":
        keep = _nm_decode(tensors["nm"], *info["nm"], R, C)[:, perm]
    codes = torch.empty(R, C, dtype=torch.int32)
    off = 0
    for j, ((s, e, b), nbytes) in enumerate(zip(runs, info["code_bytes"])):
        data = tensors["codes"][off:off + nbytes]
        off += nbytes
        if keep is None:
            codes[:, s:e] = unpack_bits(data, b, R * (e - s)).reshape(R, e - s)
        else:
            sl = keep[:, s:e]
            qj = zero[:, j:j + 1].to(torch.int32).expand(R, e - s).clone()
            qj[sl] = unpack_bits(data, b, int(sl.sum()))
            codes[:, s:e] = qj
    return {"codes": codes, "keep": keep, "scale": scale, "zero": zero, "perm": perm, "runs": runs}


def unpack_linear(tensors: dict[str, torch.Tensor], info: dict, version: int = FORMAT_VERSION) -> torch.Tensor:
    """The fp32 weight (out, in) in the original column order, from `pack_linear`'s output."""
    parts = decode_parts(tensors, info, version)
    codes, scale, zero, perm = parts["codes"], parts["scale"], parts["zero"], parts["perm"]
    Wp = torch.empty(codes.shape, dtype=torch.float32)
    for j, (s, e, _) in enumerate(parts["runs"]):
        Wp[:, s:e] = _decode_run(codes[:, s:e], scale[:, j:j + 1], zero[:, j:j + 1])
    W = torch.empty_like(Wp)
    W[:, perm] = Wp
    return W


# ---------------------------------------------------------------- whole model
PACKED_PARTS = ("codes", "scale", "zero", "perm", "mask", "nm")  # the tensors of one packed linear


def unique_state(model, skip: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict without aliases (tied weights): tensors on the CPU, and alias -> kept name.
    skip: leave out keys with this prefix (the decoder layers of a streamed model, which are
    written one at a time and are meta here)."""
    tensors, seen, tied = {}, {}, {}
    for k, v in model.state_dict().items():
        if skip and k.startswith(skip):
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            tied[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = v.detach().cpu().contiguous()
    return tensors, tied


def pack_state(state: dict[str, torch.Tensor], reports: dict, nm: tuple[int, int] = (0, 0)
               ) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """The tensors to store for `state` (full names): each quantized linear's weight (one with
    qparams in `reports`, keyed by module path) replaced by its packed tensors. Returns them,
    the header entries of the packed linears and the linears left dense (off their grid)."""
    out = dict(state)
    linears, fallback = {}, []
    for name, rep in reports.items():
        qp = getattr(rep, "qparams", None)
        key = f"{name}.weight"
        if qp is None or key not in state:
            continue
        packed = pack_linear(state[key], qp, nm)
        if packed is None:
            fallback.append(name)
            continue
        tensors, info = packed
        del out[key]
        linears[name] = info
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
    return out, linears, fallback


def packed_header(dtype: torch.dtype, tied: dict, linears: dict, fallback: list[str]) -> dict:
    """The JSON header of a packed checkpoint (the safetensors metadata key "packing", or the
    index's metadata for a sharded one)."""
    return {"format": "mi-packed", "version": FORMAT_VERSION, "dtype": str(dtype).replace("torch.", ""),
            "tied": tied, "linears": linears, "dense_fallback": fallback}


def tally(tensors: dict[str, torch.Tensor], linears: dict) -> dict[str, int]:
    """Bytes and parameters of stored tensors, split into packed linears and everything else."""
    out = {"count": len(linears), "qbytes": 0,
           "qparams": sum(info["shape"][0] * info["shape"][1] for info in linears.values()),
           "other_params": 0, "other_bytes": 0}
    for k, v in tensors.items():
        owner, _, part = k.rpartition(".")
        nbytes = v.numel() * v.element_size()
        if owner in linears and part in PACKED_PARTS:
            out["qbytes"] += nbytes
        else:
            out["other_params"] += v.numel()
            out["other_bytes"] += nbytes
    return out


def disk_report(counts: dict[str, int], size: int, tied: dict, fallback: list[str], shards: int = 1) -> dict:
    """The report's "disk" entry: bytes on disk (the file, or all shards and their index, which
    holds the header) against 2 bytes per parameter, and what the quantized linears take."""
    params = counts["qparams"] + counts["other_params"]
    q = counts["qparams"]
    disk = {"format": "packed", "file": PACKED_FILE, "bytes": size, "fp16_bytes": 2 * params,
            "ratio_vs_fp16": 2 * params / size,
            "quantized_linears": {"count": counts["count"], "params": q, "bytes": counts["qbytes"], "fp16_bytes": 2 * q,
                                  "bits_per_weight": 8 * counts["qbytes"] / q if q else None},
            "other_params": counts["other_params"],
            # what is stored as it was: embeddings, lm_head, norms, biases, linears left dense (tied
            # weights once)
            "other_bytes": counts["other_bytes"],
            "tied": sorted(tied), "dense_fallback": fallback}
    if shards > 1:
        disk["shards"] = shards
    return disk


def warn_fallback(fallback: list[str]) -> None:
    if fallback:
        warnings.warn(f"{len(fallback)} quantized linear(s) are off their grid and were stored "
                      f"dense: {', '.join(fallback[:3])}")


def save_packed(model, folder, tokenizer=None, reports: dict | None = None, nm: tuple[int, int] = (0, 0),
                pruned: bool = False) -> dict:
    """Write config, packed.safetensors (one file) and, where possible, a GPTQ-layout copy in
    folder/gptq, from a model held whole in memory (the CLI writes the sharded form layer by
    layer: streaming.SaveWriter). reports: module path -> LinearReport (its qparams); nm: the
    N:M pattern if any; pruned: whether weights were pruned (the GPTQ copy is written for
    unpruned models only). Returns the disk report (bytes against 2 bytes per parameter)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, tied = unique_state(model)
    dtype = next(iter(state.values())).dtype if state else torch.float16
    out, linears, fallback = pack_state(state, reports or {}, nm)
    warn_fallback(fallback)
    path = folder / PACKED_FILE
    save_file(out, str(path), metadata={"packing": json.dumps(packed_header(dtype, tied, linears, fallback))})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    disk = disk_report(tally(out, linears), path.stat().st_size, tied, fallback)
    disk["gptq"] = save_gptq(model, folder / "gptq", reports or {}, tokenizer) if not pruned and reports \
        else gptq_skipped(pruned)
    return disk


def gptq_skipped(pruned: bool) -> dict:
    return {"written": False, "reason": "pruned weights (the GPTQ layout cannot exploit sparsity)" if pruned
            else "nothing quantized"}


def read_packed(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, every stored tensor) of a packed save: packed.safetensors, or the shards listed
    by packed.safetensors.index.json (whose metadata holds the header)."""
    from safetensors import safe_open
    folder = Path(folder)
    single, index = folder / PACKED_FILE, folder / (PACKED_FILE + ".index.json")
    if single.is_file():
        files = [single]
        with safe_open(str(single), framework="pt") as f:
            header = json.loads(f.metadata()["packing"])
    elif index.is_file():
        meta = json.loads(index.read_text())
        header = meta["metadata"]["packing"]
        files = [folder / name for name in sorted(set(meta["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"no {PACKED_FILE} or {index.name} in {folder}")
    if header.get("format") != "mi-packed" or header.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder} is not a packed checkpoint this code can read")
    raw = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    return header, raw


def unpack_state(raw: dict[str, torch.Tensor], linears: dict, saved: torch.dtype, version: int = FORMAT_VERSION
                 ) -> dict[str, torch.Tensor]:
    """Stored tensors with every packed linear of `linears` (its header entries) decoded into its
    dense weight in the saved dtype, bit for bit what the dense save holds."""
    out = dict(raw)
    for name, info in linears.items():
        parts = {p: out.pop(f"{name}.{p}") for p in PACKED_PARTS if f"{name}.{p}" in out}
        out[f"{name}.weight"] = unpack_linear(parts, info, version).to(saved)
    return out


def describe_disk(disk: dict) -> str:
    """One line for the log."""
    q = disk["quantized_linears"]
    where = f"{disk['file']} ({disk['shards']} shards)" if disk.get("shards") else disk["file"]
    line = (f"{where} {disk['bytes'] / 2**20:.2f} MiB vs fp16 {disk['fp16_bytes'] / 2**20:.2f} MiB "
            f"({disk['ratio_vs_fp16']:.2f}x smaller)")
    if q["params"]:
        line += (f"; quantized linears {q['bytes'] / 2**20:.2f} MiB vs {q['fp16_bytes'] / 2**20:.2f} MiB, "
                 f"{q['bits_per_weight']:.2f} bits/weight")
    if "other_bytes" in disk:
        line += (f"; {disk['other_bytes'] / 2**20:.2f} MiB ({100 * disk['other_bytes'] / disk['bytes']:.0f}%) is "
                 "not compressed linears (embeddings, lm_head, norms, biases)")
    g = disk.get("gptq", {})
    line += f"; GPTQ copy in gptq/ ({g['checkpoint_format']})" if g.get("written") else \
        f"; no GPTQ copy: {g.get('reason')}"
    return line


def load_packed(folder, dtype=torch.float16, device="cpu", keep_packed: bool = False, group_inputs: bool = True):
    """Rebuild the transformers model of a packed save (one file or sharded): weights decoded in
    fp32, cast to the saved dtype (as the dense save holds them), then to `dtype` (None: the
    saved dtype). keep_packed: the packed linears become `mixed_linear.MixedBitLinear` modules
    that keep the codes on `device` and never build the dense weight (run at the compressed size);
    group_inputs: q/k/v and gate/up of each layer run at one token as one launch where that pays
    (`mixed_linear.group_shared_inputs`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = Path(folder)
    header, raw = read_packed(folder)
    saved = getattr(torch, header["dtype"])
    dtype = dtype or saved
    version = header.get("version", 1)
    packed = {}
    if keep_packed:
        for name, info in header["linears"].items():
            parts = {p: raw.pop(f"{name}.{p}") for p in PACKED_PARTS if f"{name}.{p}" in raw}
            packed[name] = decode_parts(parts, info, version)
    else:
        raw = unpack_state(raw, header["linears"], saved, version)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in raw.items()}
    for alias, kept in header["tied"].items():
        state[alias] = state[kept]
    cfg = AutoConfig.from_pretrained(folder)
    cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    model, info = cls.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype, output_loading_info=True)
    expected = set(header["tied"]) | {f"{name}.weight" for name in packed}
    missing = [k for k in info["missing_keys"] if k not in expected]
    if missing or info["unexpected_keys"]:
        raise ValueError(f"packed checkpoint does not match its config: missing {missing[:5]}, "
                         f"unexpected {list(info['unexpected_keys'])[:5]}")
    if packed:
        from mixed_linear import MixedBitLinear
        for name, parts in packed.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            dense = getattr(owner, child)
            bias = None if dense.bias is None else dense.bias.data
            setattr(owner, child, MixedBitLinear.from_parts(parts, bias=bias, dtype=dtype, device=device,
                                                            saved_dtype=saved))
            del dense
        if group_inputs:
            from mixed_linear import group_shared_inputs
            group_shared_inputs(model)
    return model.to(device).eval()


# ---------------------------------------------------------------- GPTQ layout
def gptq_group_size(reports: dict) -> tuple[int, int] | str:
    """(bits, group_size) shared by every quantized linear in the GPTQ sense, or why there is none."""
    bits, first = set(), set()
    for name, rep in reports.items():
        qp = rep.qparams
        if qp is None:
            return f"{name} is not quantized"
        C = rep.shape[1]
        if not torch.equal(qp["perm"].long().cpu(), torch.arange(C)):
            return f"{name} has a column permutation (mixed widths or act-order)"
        bits.update(b for _, _, b in qp["runs"])
        if len(qp["runs"]) > 1:
            first.add(qp["runs"][0][1] - qp["runs"][0][0])
    if len(bits) != 1 or next(iter(bits)) not in (2, 3, 4, 8):
        return f"widths {sorted(bits)} are not one of 2, 3, 4, 8"
    if len(first) > 1:
        return f"group sizes differ between linears: {sorted(first)}"
    b = next(iter(bits))
    g = next(iter(first)) if first else -1
    for name, rep in reports.items():
        C = rep.shape[1]
        step = C if g < 0 else g
        if [tuple(r[:2]) for r in rep.qparams["runs"]] != [(c, min(c + step, C)) for c in range(0, C, step)]:
            return f"{name} runs are not groups of {g}"
        R = rep.shape[0]
        if (C * b) % 32 or (R * b) % 32:
            return f"{name} shape {R}x{C} does not fill whole 32-bit words at {b} bits"
    return b, g


def gptq_tensors(W: torch.Tensor, qparams: dict, bits: int, group_size: int, v2: bool = False
                 ) -> dict[str, torch.Tensor]:
    """qweight (in*bits/32, out) int32 packed along the input dimension, qzeros
    (n_groups, out*bits/32) int32 packed along the output dimension (stored zero - 1 unless
    v2), scales (n_groups, out) fp16, g_idx (in,) int32. Within a 32-bit word, value k of a
    column sits at bits [k*bits, (k+1)*bits); at 3 bits 32 values span 3 words, values
    straddling words split low bits first: this is the AutoGPTQ packing."""
    q = codes_of(W, qparams)  # identity perm: original column order
    R, C = q.shape
    zero = qparams["zero"].to(torch.int32).cpu()  # (R, n_groups)
    stored = zero if v2 else zero - 1
    qweight = pack_bits(q, bits).view(torch.int32).reshape(R, C * bits // 32).t().contiguous()
    qzeros = pack_bits((stored & (2 ** bits - 1)).t().contiguous(), bits).view(torch.int32)
    g = C if group_size < 0 else group_size
    return {"qweight": qweight, "qzeros": qzeros.reshape(zero.shape[1], R * bits // 32),
            "scales": qparams["scale"].t().to(torch.float16).contiguous(),
            "g_idx": (torch.arange(C, dtype=torch.int32) // g).to(torch.int32)}


def gptq_plan(reports: dict) -> dict | str:
    """The GPTQ layout every linear of `reports` shares: bits, group_size, v2 (some zero point is
    0, which v1's stored zero - 1 cannot hold) and sym; or why there is none."""
    shape = gptq_group_size(reports)
    if isinstance(shape, str):
        return shape
    bits, group_size = shape
    return {"bits": bits, "group_size": group_size,
            "v2": any(bool((rep.qparams["zero"] == 0).any()) for rep in reports.values()),
            "sym": all(bool((rep.qparams["zero"] == 2 ** (bits - 1)).all()) for rep in reports.values())}


def gptq_state(state: dict[str, torch.Tensor], reports: dict, plan: dict) -> str | None:
    """Replace, in place, the weight of each linear of `reports` found in `state` (full names)
    by its GPTQ tensors; returns why not where one is off its grid (state is then partial)."""
    for name, rep in reports.items():
        key = f"{name}.weight"
        if key not in state:
            continue
        W = state.pop(key)
        if codes_of(W, rep.qparams) is None:
            return f"{name} is off its quantization grid"
        for k, v in gptq_tensors(W, rep.qparams, plan["bits"], plan["group_size"], plan["v2"]).items():
            state[f"{name}.{k}"] = v
    return None


def write_gptq_config(folder, config, plan: dict, tokenizer=None) -> dict:
    """config.json with its quantization_config, quantize_config.json and the tokenizer of a GPTQ
    copy (checkpoint_format "gptq", or "gptq_v2" where plan["v2"]); returns the report entry."""
    fmt = "gptq_v2" if plan["v2"] else "gptq"
    folder = Path(folder)
    qcfg = {"quant_method": "gptq", "bits": plan["bits"], "group_size": plan["group_size"], "desc_act": False,
            "sym": plan["sym"], "true_sequential": True, "static_groups": False, "format": fmt,
            "checkpoint_format": fmt}
    config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "quantize_config.json").write_text(json.dumps(
        {k: v for k, v in qcfg.items() if k != "format"}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if plan["v2"]:
        warnings.warn("some zero points are 0, which the v1 GPTQ format (zero - 1) cannot store; "
                      "the GPTQ copy is written as gptq_v2 (GPTQModel loads it; older loaders do not)")
    return {"written": True, "folder": "gptq", "bits": plan["bits"], "group_size": plan["group_size"],
            "sym": plan["sym"], "checkpoint_format": fmt}


def save_gptq(model, folder, reports: dict, tokenizer=None) -> dict:
    """The standard GPTQ checkpoint (HF / AutoGPTQ / GPTQModel layout, desc_act false) in
    folder, when every linear shares one width in 2/3/4/8 and one group size, in the original
    column order. Writes checkpoint_format "gptq" (v1: stored zero = zero - 1, what loaders
    expect by default) unless some zero point is 0, which v1 cannot hold: then "gptq_v2"."""
    from safetensors.torch import save_file
    plan = gptq_plan(reports)
    if isinstance(plan, str):
        return {"written": False, "reason": plan}
    state, _ = unique_state(model)
    reason = gptq_state(state, reports, plan)
    if reason is not None:
        return {"written": False, "reason": reason}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = write_gptq_config(folder, model.config, plan, tokenizer)
    return {**out, "bytes": (folder / "model.safetensors").stat().st_size}
