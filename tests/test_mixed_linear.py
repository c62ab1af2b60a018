"""MixedBitLinear on the CPU: its decode equals packing's dense decode bit for bit (mixed widths
2..8, unstructured and 2:4 sparsity, GQA shapes, biases, odd run lengths), its forward equals the
dense layer's, and `packing.load_packed(keep_packed=True)` gives the dense model's logits.

    python -m pytest -q tests/test_mixed_linear.py

The Triton kernel itself runs here only under Triton's interpreter, when triton is installed
(a subprocess with TRITON_INTERPRET=1); tests_gpu/test_mixed_kernel.py checks it on CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import packing
from mixed_linear import MixedBitLinear

REPO = Path(__file__).resolve().parents[1]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns (-0.0 and +0.0 differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def random_runs(C: int, widths: list[int], gen: torch.Generator) -> list[tuple[int, int, int]]:
    """Runs of random (odd, uneven) lengths covering C columns, one per width."""
    cuts = sorted((torch.randperm(C - 1, generator=gen)[:len(widths) - 1] + 1).tolist())
    bounds = [0] + cuts + [C]
    return [(bounds[i], bounds[i + 1], widths[i]) for i in range(len(widths))]


def quantize(W: torch.Tensor, widths: list[int], gen: torch.Generator, prune: str | None = None
             ) -> tuple[torch.Tensor, dict]:
    """Min-max round-to-nearest of W (out, in) over random runs of a random column permutation,
    one grid per (row, run), with optional pruning ('50%' unstructured, '2:4' on original columns).
    Returns the quantized weight (W's dtype, pruned weights exactly 0) and packing's qparams."""
    R, C = W.shape
    perm = torch.randperm(C, generator=gen)
    runs = random_runs(C, widths, gen)
    keep = torch.ones(R, C, dtype=torch.bool)
    if prune == "50%":
        keep = torch.rand(R, C, generator=gen) >= 0.5
    elif prune == "2:4":
        score = torch.rand(R, C // 4, 4, generator=gen)
        top = score.topk(2, dim=2).indices
        keep = torch.zeros(R, C // 4, 4, dtype=torch.bool).scatter_(2, top, True).reshape(R, C)
    Wp, keep_p = W.float()[:, perm], keep[:, perm]
    scale = torch.empty(R, len(runs))
    zero = torch.empty(R, len(runs))
    Q = torch.empty(R, C)
    for j, (s, e, b) in enumerate(runs):
        w = Wp[:, s:e]
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        sc = ((hi - lo) / (2 ** b - 1)).half().float().clamp(min=2.0 ** -24)  # fp16 steps, as the file stores
        z = torch.round(-lo / sc).clamp(0, 2 ** b - 1)
        q = (torch.round(w / sc[:, None]) + z[:, None]).clamp(0, 2 ** b - 1)
        q = torch.where(keep_p[:, s:e], q, z[:, None])  # a pruned weight is its zero point: exactly 0
        scale[:, j], zero[:, j] = sc, z
        Q[:, s:e] = sc[:, None] * (q - z[:, None])
    out = torch.empty(R, C)
    out[:, perm] = Q
    return out.to(W.dtype), {"perm": perm, "runs": runs, "scale": scale, "zero": zero}


def packed_linear(R: int, C: int, widths: list[int], prune: str | None, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    W, qp = quantize(torch.randn(R, C, generator=gen).to(dtype), widths, gen, prune)
    packed = packing.pack_linear(W, qp, (2, 4) if prune == "2:4" else (0, 0))
    assert packed is not None
    return W, packed


# (out, in, widths, pruning): GQA-like q/k shapes, every width 2..8 (3/5/6/7 straddle a 32-bit
# word in a plain bit stream), runs shorter than a 32-column tile, an in_features not a multiple of 32
CASES = [
    (64, 96, [3, 5, 2, 7, 4, 8, 6, 3], None),
    (32, 96, [5, 3, 7], "50%"),
    (64, 96, [2, 4, 6, 3], "2:4"),
    (24, 80, [7, 2, 5, 5, 3, 8, 4], "50%"),
    (40, 200, [3, 3, 4, 2, 6, 7, 5, 3, 4, 2], "2:4"),
    (16, 37, [6, 2], None),
]


@pytest.mark.parametrize("R,C,widths,prune", CASES)
@pytest.mark.parametrize("saved,dtype", [(torch.float16, torch.float16), (torch.float32, torch.float32),
                                         (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.float32)])
def test_decode_equals_dense_decode(R, C, widths, prune, saved, dtype):
    W, (tensors, info) = packed_linear(R, C, widths, prune, saved, seed=R * C + len(widths))
    mask = {None: "dense", "50%": "bitmask", "2:4": "nm"}[prune]
    assert info["mask"] == mask
    parts = packing.decode_parts(tensors, info)
    m = MixedBitLinear.from_parts(parts, bias=None, dtype=dtype, device="cpu", saved_dtype=saved)
    dense = packing.unpack_linear(tensors, info).to(saved).to(dtype)  # load_packed's dense path
    assert bits_equal(m.dequantize(), dense)
    assert bits_equal(dense, W.to(dtype))  # and that is the quantized weight itself
    assert m.in_features == C and m.out_features == R and not hasattr(m, "weight")
    expected: dict[int, int] = {}
    for s, e, b in info["runs"]:
        expected[b] = expected.get(b, 0) + e - s
    assert m.widths() == dict(sorted(expected.items()))


@pytest.mark.parametrize("R,C,widths,prune", CASES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_equals_dense_linear(R, C, widths, prune, dtype):
    """The CPU path is F.linear with the dense weight: outputs equal bit for bit, bias included."""
    W, (tensors, info) = packed_linear(R, C, widths, prune, dtype, seed=7 + R)
    bias = torch.randn(R, generator=torch.Generator().manual_seed(1)).to(dtype)
    m = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=bias, dtype=dtype, device="cpu")
    x = torch.randn(3, 5, C, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = m(x)
    assert y.shape == (3, 5, R) and y.dtype == dtype
    assert bits_equal(y, F.linear(x, W, bias))
    m_nb = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=None, dtype=dtype, device="cpu")
    assert bits_equal(m_nb(x), F.linear(x, W))


def test_layout_is_compact_and_survives_casts():
    """Codes take their width (up to the tiles where two widths meet); the file's fp16 scales are
    held as raw bits (int16), so a model-wide .half() or .to(bfloat16) cannot round them."""
    widths = [3, 5, 2, 7, 4, 6]
    W, (tensors, info) = packed_linear(128, 2048, widths, None, torch.float32, seed=3)
    m = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=None, dtype=torch.float32, device="cpu")
    exact_bits = sum((e - s) * b for s, e, b in info["runs"]) * 128
    stored_bits = m.qweight.numel() * 32
    assert exact_bits <= stored_bits <= exact_bits + len(widths) * 32 * 8 * 128  # one shared tile per width change
    assert stored_bits / exact_bits < 1.02
    assert m.scale_bits.dtype == torch.int16
    # zero points: one bit stream per run at the run's width, each from a word boundary
    assert m.zero.dtype == torch.int32 and m.zero.numel() == sum(-(-128 * b // 32) for _, _, b in info["runs"])
    assert torch.equal(m.zero_points().t(), packing.decode_parts(tensors, info)["zero"].int())
    before = m.dequantize()
    m.half()
    assert bits_equal(m.dequantize(torch.float32), before)
    assert "avg_bits=" in repr(m) and "widths={2:" in repr(m)


def test_zero_points_wider_than_their_run_are_kept():
    """A zero point that does not fit its run's width (not one a b-bit grid makes, but legal in
    the parts) widens that run's stream instead of being cut."""
    _, (tensors, info) = packed_linear(40, 96, [3, 2, 5], None, torch.float32, seed=4)
    parts = packing.decode_parts(tensors, info)
    parts["zero"][7, 1] = 200.0  # run 1 is 2 bits wide
    m = MixedBitLinear.from_parts(parts, bias=None, dtype=torch.float32, device="cpu")
    assert torch.equal(m.zero_points().t(), parts["zero"].int())
    assert m.zs[1] >> 27 == 8 and m.zs[0] >> 27 == 3


@pytest.mark.parametrize("R,C,widths,prune", CASES + [(32, 1024, [3, 5, 2], None)])
def test_dequant_tiles_name_their_first_run(R, C, widths, prune):
    """dequant_meta's tile table: each tile names the run of its first kernel column, that run's
    scale/zero row, zero stream and end column; the tile lies in one run (padding included) exactly
    when that end is past the tile. Checked against a per-column run map."""
    _, (tensors, info) = packed_linear(R, C, widths, prune, torch.float32, seed=R + C)
    m = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=None, dtype=torch.float32, device="cpu")
    tiles, kr = m.dequant_meta(torch.device("cpu"))
    col_run = torch.full((tiles.shape[0] * 32,), -1)
    for s, e, _, j in m.kruns:
        col_run[s:e] = j
    col_run[m.kruns[-1][1]:] = m.kruns[-1][3]  # the padding columns: the last run's
    meets = 0
    for t, (b, W0, nt, tb, i, run, zs, end) in enumerate(tiles.tolist()):
        assert kr[i, 0] <= t * 32 < kr[i + 1, 0] == end
        assert run == kr[i, 1] == col_run[t * 32] and zs == m.zs[run]
        one = len(col_run[t * 32:(t + 1) * 32].unique()) == 1
        assert one == (end >= (t + 1) * 32)
        meets += not one
    assert meets > 0 and (C < 1024 or meets < tiles.shape[0] // 2)  # wide runs: mostly one-run tiles


def test_fp16_exact_scales_are_stored_in_fp16():
    W, (tensors, info) = packed_linear(32, 96, [4, 3], None, torch.float16, seed=5)
    tensors = dict(tensors, scale=tensors["scale"].half().float())  # a grid that fp16 holds exactly
    W = packing.unpack_linear(tensors, info).half()
    m = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), None, torch.float16, "cpu")
    assert m.scale_bits.dtype == torch.int16
    assert bits_equal(m.dequantize(), W)


def test_bad_parts_are_refused():
    _, (tensors, info) = packed_linear(16, 64, [4, 3], None, torch.float32, seed=0)
    parts = packing.decode_parts(tensors, info)
    with pytest.raises(ValueError, match="do not cover"):
        MixedBitLinear.from_parts(dict(parts, runs=parts["runs"][:1]), None, torch.float32, "cpu")
    s, e, _ = parts["runs"][0]
    with pytest.raises(ValueError, match="outside 2..8"):
        MixedBitLinear.from_parts(dict(parts, runs=[(s, e, 9)] + parts["runs"][1:]), None, torch.float32, "cpu")


# ---------------------------------------------------------------- a whole model through load_packed
def compress_tiny(model_type: str, dtype: torch.dtype, prune: str | None, seed: int):
    """A tiny random model (the shapes of tests/conftest.py: GQA with 4 query / 2 KV heads) whose
    decoder linears are rounded to mixed widths over random runs; returns it and packing's
    reports ({name: object with .qparams and .shape})."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    extra = {"use_sliding_window": False} if model_type == "qwen2" else {}
    cfg = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                               tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    reports = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            if mod.bias is not None:
                mod.bias.data.normal_()  # a visible bias (the random init leaves it at 0)
            widths = torch.randint(2, 9, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist()
            Q, qp = quantize(mod.weight.data, widths, gen, prune)
            mod.weight.data = Q
            reports[name] = types.SimpleNamespace(qparams=qp, shape=tuple(Q.shape))
    return model, reports


@pytest.mark.parametrize("model_type,saved,prune,loads", [
    ("llama", torch.float32, "50%", (torch.float32, torch.float16)),
    ("qwen2", torch.float16, "2:4", (torch.float16,)),  # q/k/v biases
    ("llama", torch.bfloat16, None, (torch.bfloat16,)),
])
def test_load_packed_keep_packed_equals_dense(tmp_path, model_type, saved, prune, loads):
    model, reports = compress_tiny(model_type, saved, prune, seed=4)
    packing.save_packed(model, tmp_path, reports=reports, nm=(2, 4) if prune == "2:4" else (0, 0),
                        pruned=prune is not None)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    for dtype in loads:
        dense = packing.load_packed(tmp_path, dtype=dtype)
        fast = packing.load_packed(tmp_path, dtype=dtype, keep_packed=True)
        mixed = {n: m for n, m in fast.named_modules() if isinstance(m, MixedBitLinear)}
        assert set(mixed) == set(reports)
        for name, m in mixed.items():
            assert bits_equal(m.dequantize(), dense.get_submodule(name).weight.data), name
            assert (m.bias is None) == (dense.get_submodule(name).bias is None)
        assert not any(k.endswith("proj.weight") and ".layers." in k for k in fast.state_dict())
        with torch.no_grad():
            assert bits_equal(fast(ids).logits, dense(ids).logits)
            if dtype == loads[0]:  # generate() goes through the module too (with a KV cache)
                a = dense.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
                b = fast.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
                assert torch.equal(a, b)
        packed_bytes = sum(m.packed_bytes() for m in mixed.values())
        dense_bytes = sum(dense.get_submodule(n).weight.numel() * 2 for n in mixed)
        assert packed_bytes < dense_bytes  # tiny layers: the per-row grid dominates, but it is smaller


# ---------------------------------------------------------------- the Triton kernel, interpreted on the CPU
INTERPRET_PRELUDE = r"""
import numpy as np, torch, packing, mixed_kernel
from triton.runtime import interpreter
from mixed_linear import MixedBitLinear
import tests.test_mixed_linear as t
torch.manual_seed(0)  # the same inputs on every machine

def rel_err(out, x, W, bias):
    # the largest error of an output against its rounding scale, sum |x_k W_jk| + |b_j|: fp32 sums
    # come to ~6e-8 of it, one 8-bit code one step off (of 640 columns) to 2e-5 or more
    ref = torch.nn.functional.linear(x.double(), W.double(), bias.double())
    scale = torch.nn.functional.linear(x.double().abs(), W.double().abs(), bias.double().abs())
    return float(((out.double() - ref).abs() / scale).max())

# every unmasked address a program touches must lie inside one of the launch's buffers
BUFFERS = []
def checked(fn, ptr_arg, mask_arg):
    def wrapper(self, *args):
        ptrs, mask = args[ptr_arg], args[mask_arg]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addr = ptrs.data[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)].astype(np.uint64)
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in BUFFERS:
            inside |= (addr >= np.uint64(lo)) & (addr + np.uint64(size) <= np.uint64(hi))
        assert inside.all(), f"out of bounds: {fn.__name__}"
        return fn(self, *args)
    return wrapper
B = interpreter.InterpreterBuilder
B.create_masked_load = checked(B.create_masked_load, 0, 1)
B.create_masked_store = checked(B.create_masked_store, 0, 2)
B.create_atomic_rmw = checked(B.create_atomic_rmw, 1, 3)

def outputs_allowed(fn, *args):
    # fn(*args), with every block torch.empty allocates meanwhile (a launcher's output) added to BUFFERS
    orig_empty = torch.empty
    def empty(*a, **k):
        o = orig_empty(*a, **k)
        BUFFERS.append((o.data_ptr(), o.data_ptr() + o.numel() * o.element_size()))
        return o
    torch.empty = empty
    try:
        return fn(*args)
    finally:
        torch.empty = orig_empty
"""

INTERPRET_SCRIPT = INTERPRET_PRELUDE + r"""
FMA = dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, USE_DOT=False)  # one token per program, 2 tiles a step
DOT = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, USE_DOT=True)
RUNS = {0: [(1, torch.float32, dict(FMA, unit_k=32), True), (5, torch.float16, dict(DOT, unit_k=64), True)],
        3: [(1, torch.float32, dict(FMA, unit_k=64), False), (2, torch.float32, dict(FMA, unit_k=32), True),
            (5, torch.float16, dict(DOT, unit_k=32), False)]}
for case, runs in RUNS.items():  # all widths; in_features 96 and 80 (a padded tile)
    R, C, widths, prune = t.CASES[case]
    W, (tensors, info) = t.packed_linear(R, C, widths, prune, torch.float32, seed=11)
    parts = packing.decode_parts(tensors, info)
    bias = torch.randn(R)
    m = MixedBitLinear.from_parts(parts, bias=bias, dtype=torch.float32, device="cpu")
    for M, dtype, cfg, gather in runs:
        cfg = dict(cfg, GATHER=gather, num_warps=4)
        x = torch.randn(M, C).to(dtype)
        xg = x.index_select(1, m.kcols.int())
        units = m.units(cfg["unit_k"], x.device)
        mixed_kernel.workspace(x.device, M * R, 64)
        ws, cnt = mixed_kernel._WORKSPACE[x.device]
        BUFFERS[:] = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
                      for b in (x, xg, m.kcols, m.qweight, units, m.scale_bits, m.zero, bias, ws, cnt)]
        out = outputs_allowed(mixed_kernel.launch, x, m.kcols, m.qweight, units, m.scale_bits, m.zero, bias, R, cfg, xg)
        err = rel_err(out, x, W, bias)
        tol = 1e-6 if dtype == torch.float32 else 2e-3  # fp32 sums; fp16 output rounding
        assert out.dtype == dtype and err < tol, (R, C, M, cfg, err)
        assert not ws.any() and not cnt.any()  # left clean for the next call
print("ok")
"""


def run_interpreted(script: str) -> None:
    """Run `script` in a subprocess under Triton's interpreter; it must print "ok" last."""
    pytest.importorskip("triton")
    import numpy as np
    if tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton 3.6's interpreter needs numpy < 2.4 (int() of a 1-element array)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_kernel_under_triton_interpreter():
    run_interpreted(INTERPRET_SCRIPT)


GEMV_SCRIPT = INTERPRET_PRELUDE + r"""
# (case, tokens, x dtype, config): every width 2..8 (case 0), a padded last tile (80, 37 columns),
# unstructured and 2:4 pruning, SPLIT 1 (direct store) and split-K (parts of one width each, a
# unit cut at a part boundary), one token (gemv_kernel's pipelined path) and 2-4 tokens (its slot loop), x gathered
# in the kernel or before it
G = dict(GEMV=True, BLOCK_N=16, num_warps=4)
RUNS = [(0, 1, torch.float32, dict(G, BLOCK_M=1, TS=2, SPLIT=1, GATHER=True)),
        (0, 2, torch.float16, dict(G, BLOCK_M=2, TS=1, SPLIT=3, GATHER=False)),
        (3, 3, torch.float32, dict(G, BLOCK_M=4, TS=2, SPLIT=2, GATHER=True)),
        (4, 1, torch.float16, dict(G, BLOCK_M=1, TS=4, SPLIT=4, GATHER=True)),
        (5, 1, torch.float32, dict(G, BLOCK_M=1, TS=1, SPLIT=4, GATHER=False))]
# longer: several runs of one width in a part, each several steps long (the one-token pipeline
# goes on across units), parts cut inside runs, and one part for all widths
LONG = (48, 900, [3, 2, 4, 3, 4, 5, 2, 4, 3, 5, 4], None)
RUNS += [(LONG, 1, torch.float32, dict(G, BLOCK_M=1, TS=1, SPLIT=6, GATHER=True)),
         (LONG, 1, torch.float32, dict(G, BLOCK_M=1, TS=2, SPLIT=1, GATHER=False)),
         (LONG, 3, torch.float32, dict(G, BLOCK_M=4, TS=2, SPLIT=5, GATHER=True))]
# runs of widths 6, 7 and 8 that fill whole tiles (case 0 stores its narrow 6 and 7-bit runs in
# tiles of other widths), with and without the in-place decode
WIDE = (32, 640, [6, 7, 8], None)
RUNS += [(WIDE, 1, torch.float32, dict(G, BLOCK_M=1, TS=2, SPLIT=5, GATHER=True)),
         (WIDE, 1, torch.float32, dict(G, BLOCK_M=1, TS=2, SPLIT=5, GATHER=True, INPLACE=2)),
         (WIDE, 2, torch.float32, dict(G, BLOCK_M=2, TS=1, SPLIT=1, GATHER=True))]
# the in-place decode (INPLACE 1: widths 2 and 4; 2: every width): split-K and direct store, long runs
RUNS += [(0, 1, torch.float32, dict(G, BLOCK_M=1, TS=2, SPLIT=4, GATHER=True, INPLACE=1)),
         (0, 1, torch.float16, dict(G, BLOCK_M=1, TS=1, SPLIT=1, GATHER=False, INPLACE=2)),
         (0, 1, torch.float32, dict(G, BLOCK_M=1, TS=2, SPLIT=4, GATHER=True, INPLACE=2)),
         (LONG, 1, torch.float32, dict(G, BLOCK_M=1, TS=2, SPLIT=6, GATHER=True, INPLACE=1)),
         (LONG, 1, torch.float32, dict(G, BLOCK_M=1, TS=1, SPLIT=6, GATHER=True, INPLACE=2))]
for case, M, dtype, cfg in RUNS:
    R, C, widths, prune = t.CASES[case] if isinstance(case, int) else case
    W, (tensors, info) = t.packed_linear(R, C, widths, prune, torch.float32, seed=11)
    bias = torch.randn(R).to(dtype)
    m = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=bias, dtype=torch.float32, device="cpu")
    x = torch.randn(M, C).to(dtype)
    xg = x.index_select(1, m.kcols.int())
    units, uoff = m.split_units(cfg["SPLIT"], x.device)
    assert uoff[0] == 0 and uoff[-1] == units.shape[0] and bool((uoff[1:] > uoff[:-1]).all())
    # units tile the kernel columns in order; with several parts each part has one width and starts on a tile
    assert units[0, 0] == 0 and bool((units[1:, 0] == units[:-1, 1]).all()) and units[-1, 1] >= C
    assert (len(uoff) == 2) == (cfg["SPLIT"] == 1)
    for p in range(len(uoff) - 1 if cfg["SPLIT"] > 1 else 0):
        us = units[uoff[p]:uoff[p + 1]]
        assert len(set(us[:, 2].tolist())) == 1 and int(us[0, 0]) % 32 == 0, (p, us)
    mixed_kernel.workspace(x.device, M * R, 64)
    ws, cnt = mixed_kernel._WORKSPACE[x.device]
    BUFFERS[:] = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
                  for b in (x, xg, m.kcols, m.qweight, units, uoff, m.scale_bits, m.zero, bias, ws, cnt)]
    assert all((m.wmask >> b) & 1 for _, _, b, _ in m.blocks)  # every stored width's loop compiled in
    if case is WIDE:
        assert {6, 7, 8} <= {b for _, _, b, _ in m.blocks}
    out = outputs_allowed(mixed_kernel.gemv, x, m.kcols, m.qweight, units, uoff, m.scale_bits, m.zero, bias, R, cfg, xg,
                          m.wmask)
    err = rel_err(out, x, W, bias)
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # fp32 sums; fp16 output rounding
    assert out.dtype == dtype and out.shape == (M, R) and err < tol, (case, M, cfg, err)
    assert not ws.any() and not cnt.any()  # left clean for the next call
try:
    mixed_kernel.gemv(torch.randn(2, 96), m.kcols, m.qweight, units, uoff, m.scale_bits, m.zero, None, R,
                      dict(G, BLOCK_M=1, TS=1, SPLIT=1, GATHER=True))
    raise SystemExit("2 tokens accepted by a BLOCK_M 1 configuration")
except ValueError:
    pass
print("ok")
"""


def test_gemv_kernel_under_triton_interpreter():
    """gemv_kernel (the one-token path) equals F.linear with the exact weight, for every width,
    split-K layout and token count it takes, and leaves the shared workspace clean."""
    run_interpreted(GEMV_SCRIPT)


DEQUANT_SCRIPT = INTERPRET_PRELUDE + r"""
# (case, saved dtype, module dtype, x dtype, BLOCK_N): every width 2..8 in one module or another,
# unstructured and 2:4 pruning, GQA-like non-square shapes, row counts that BLOCK_N does not divide
# (24, 40), an in_features not a multiple of 32 (80, 200, 37), x in another dtype than the module
RUNS = [(0, torch.float32, torch.float32, torch.float32, 16), (0, torch.bfloat16, torch.bfloat16, torch.bfloat16, 64),
        (1, torch.float16, torch.float16, torch.float16, 16), (2, torch.float32, torch.bfloat16, torch.bfloat16, 32),
        (3, torch.float16, torch.float32, torch.float32, 16), (4, torch.bfloat16, torch.bfloat16, torch.float32, 16),
        (4, torch.float32, torch.float16, torch.float16, 64), (5, torch.float16, torch.float16, torch.bfloat16, 16)]
assert {3, 5, 6, 7, 8} <= {b for case, *_ in RUNS for b in t.CASES[case][2]}
assert {"50%", "2:4", None} == {t.CASES[case][3] for case, *_ in RUNS}
for case, saved, dtype, xdtype, BN in RUNS:
    R, C, widths, prune = t.CASES[case]
    W, (tensors, info) = t.packed_linear(R, C, widths, prune, saved, seed=case + 20)
    bias = torch.randn(R).to(dtype)
    m = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=bias, dtype=dtype, device="cpu",
                                  saved_dtype=saved)
    tiles, kr = m.dequant_meta(torch.device("cpu"))
    Kp = tiles.shape[0] * 32
    # decode into a wider buffer (row stride Kp): columns past in_features must stay untouched
    buf = torch.full((R, Kp), float("nan"), dtype=xdtype)
    out = buf[:, :C]
    BUFFERS[:] = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
                  for b in (m.qweight, tiles, kr, m.scale_bits, m.zero, buf)]
    mixed_kernel.dequantize_into(out, m.qweight, tiles, kr, m.scale_bits, m.zero, m.saved_dtype,
                                 dict(BLOCK_N=BN, num_warps=4))
    ref = m.dequantize(xdtype)[:, m.kcols[:C].long()]
    assert t.bits_equal(out, ref), (case, saved, dtype, xdtype, int((out != ref).sum()))
    assert bool(buf[:, C:].isnan().all())
    # the forward's dense path: x gathered into kernel order, the decode, F.linear with the bias
    x = torch.randn(33, C).to(xdtype)
    mixed_kernel.dense_workspace(x.device, xdtype, R, C)  # grown here, so its address is known
    ws = mixed_kernel._DENSE[x.device]
    BUFFERS[:] = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
                  for b in (m.qweight, tiles, kr, m.scale_bits, m.zero, ws)]
    y = m.forward_dense(x, dict(BLOCK_N=BN, num_warps=4))
    assert mixed_kernel._DENSE[x.device] is ws  # reused, not reallocated
    assert y.dtype == xdtype and y.shape == (33, R)
    assert t.bits_equal(mixed_kernel.dense_workspace(x.device, xdtype, R, C), ref)  # the decode it used
    err = rel_err(y, x, m.dequantize(xdtype), bias.to(xdtype))
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xdtype]  # the output rounding
    assert err < tol, (case, xdtype, err)
print("ok")
"""


def test_dequant_kernel_under_triton_interpreter():
    """dequant_kernel decodes bit for bit what `dequantize()` builds (in kernel column order), for
    every width, saved dtype and output dtype; the dense forward path equals F.linear with it."""
    run_interpreted(DEQUANT_SCRIPT)


def every_width_linear() -> MixedBitLinear:
    """A 40x1000 fp32 module with runs of every width 2..8, some of them repeated."""
    _, (tensors, info) = packed_linear(40, 1000, [3, 3, 4, 2, 6, 7, 5, 3, 4, 2, 8], None, torch.float32, seed=5)
    return MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=None, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("step_cost", [None, 3.0])
@pytest.mark.parametrize("split,max_tiles", [(2, 1), (4, 2), (16, 3), (3, 32)])
def test_split_units_max_tiles(split, max_tiles, step_cost):
    """The Gluon kernel's work list (mixed_gemv stages a part's x in shared memory): every part one
    width, starting on a tile, at most max_tiles tiles long; the units still tile every kernel
    column in order, and a part never mixes widths even when the cap cuts a width block. Balanced
    by time (step_cost), exactly max(split, the fewest the cap allows) parts."""
    m = every_width_linear()
    C = m.in_features
    units, uoff = m.split_units(split, torch.device("cpu"), max_tiles=max_tiles, step_cost=step_cost)
    u, off = units.tolist(), uoff.tolist()
    assert off[0] == 0 and off[-1] == len(u) and all(b > a for a, b in zip(off, off[1:]))
    assert u[0][0] == 0 and all(v[0] == w[1] for w, v in zip(u, u[1:])) and u[-1][1] >= C
    uncapped = m.split_units(split, torch.device("cpu"))[1].numel() - 1
    assert len(off) - 1 >= max(uncapped if step_cost is None else 0, -(-m.blocks[-1][1] // max_tiles))
    if step_cost is not None:
        least = sum(-(-(t1 - t0) // max_tiles) for t0, t1, _, _ in m.blocks)
        assert len(off) - 1 == max(split, least)
    for p in range(len(off) - 1):
        us = u[off[p]:off[p + 1]]
        assert len({v[2] for v in us}) == 1 and len({v[4] for v in us}) == 1, us  # one width, one block
        assert us[0][0] % 32 == 0 and -(-(us[-1][1] - us[0][0]) // 32) <= max_tiles, us
    assert m.split_units(split, torch.device("cpu"))[0] is not units  # cached apart from the uncapped list
    with pytest.raises(ValueError):
        m.split_units(1, torch.device("cpu"), max_tiles=max_tiles)  # one part would mix widths


def test_block_parts_balanced_by_time():
    """block_parts with a step cost: exactly `split` parts (each block at least its fewest), and no other
    way of dealing them out has a cheaper costliest part (brute force over small cases); the costliest
    part of the 25-tile 2-bit block that the bits rule leaves whole (a 4096-input linear at 3.5 bits)
    is cut."""
    import itertools
    import random
    from mixed_linear import block_parts
    rng = random.Random(0)
    for _ in range(40):
        nb = rng.randint(1, 4)
        tiles = [rng.randint(1, 11) for _ in range(nb)]
        bits = [rng.randint(2, 8) for _ in range(nb)]
        blocks, t0 = [], 0
        for t, b in zip(tiles, bits):
            blocks.append((t0, t0 + t, b, 0))
            t0 += t
        split, cap, c = rng.randint(nb, 3 * nb + 2), rng.choice([0, 3, 5]), rng.choice([0.0, 2.5])
        least = [max(1, -(-t // cap)) if cap else 1 for t in tiles]
        n = block_parts(blocks, split, cap, c)
        assert sum(n) == min(max(split, sum(least)), sum(tiles)) and all(lo <= k <= t for lo, k, t in zip(least, n, tiles))
        worst = max(-(-t // k) * (b + c) for t, k, b in zip(tiles, n, bits))
        best = min(max(-(-t // k) * (b + c) for t, k, b in zip(tiles, ks, bits))
                   for ks in itertools.product(*[range(lo, t + 1) for lo, t in zip(least, tiles)]) if sum(ks) == sum(n))
        assert worst == best, (blocks, split, cap, c, n)
    blocks = [(0, 25, 2, 0), (25, 64, 3, 0), (64, 102, 4, 0), (102, 128, 5, 0)]
    assert block_parts(blocks, 12, 32) == [1, 3, 4, 3]  # by bits: the 2-bit part 25 tiles, 50 bit-tiles
    assert block_parts(blocks, 12, 32, 0.0) == [2, 3, 4, 3]


@pytest.mark.parametrize("split,max_tiles", [(2, 1), (16, 3), (3, 32)])
def test_part_table(split, max_tiles):
    """The Gluon kernel's part table: row p holds part p's unit range and, read from the work list,
    its width, first column, W0, nt, block start, last unit's end, first unit's a, e, run, zero
    stream and second unit's (zeros where the part has one unit); the work list is split_units'."""
    m = every_width_linear()
    cpu = torch.device("cpu")
    held = m.packed_bytes()
    units, table = m.part_table(split, cpu, max_tiles)
    ref_units, uoff = m.split_units(split, cpu, max_tiles=max_tiles)
    assert m.packed_bytes() == held + sum(t.numel() * t.element_size() for t in (units, uoff, table))  # counted
    assert units is ref_units and table.dtype == torch.int32 and table.shape == (uoff.numel() - 1, 16)
    u, off = units.tolist(), uoff.tolist()
    for p, row in enumerate(table.tolist()):
        a, b = off[p], off[p + 1]
        first, second = u[a], (u[a + 1] if a + 1 < b else [0] * 8)
        assert row[:2] == [a, b]
        assert row[2:8] == [first[2], first[0], first[4], first[5], first[6], u[b - 1][1]]
        assert row[8:12] == [first[0], first[1], first[3], first[7]]
        assert row[12:] == [second[0], second[1], second[3], second[7]]
    assert m.part_table(split, cpu, max_tiles)[1] is table  # built once
    _, with_cols = m.part_table(split, cpu, max_tiles, columns=True)  # each row followed by its part's columns
    assert torch.equal(with_cols[:, :16], table) and with_cols.shape[1] % 16 == 0 and with_cols.shape[1] > 16
    cols = with_cols[:, 16:].contiguous().view(m.kcols.dtype)
    for p, row in enumerate(table.tolist()):
        n = max(0, row[7] - row[3])
        assert torch.equal(cols[p, :n], m.kcols[row[3]:row[7]]) and not cols[p, n:].any()
    assert cols.shape[1] == max(-(-max(0, r[7] - r[3]) // 32) * 32 for r in table.tolist())


def test_one_token_lists():
    """What the forward, a group's launch and bench.gemv_floor hand a one-token kernel: gemv_kernel's work
    list and offsets; the Gluon kernel's part table, with its parts' columns where PK and GATHER ask, the
    parts balanced as STEP_COST says."""
    import mixed_kernel
    m = every_width_linear()
    cpu = torch.device("cpu")
    gemv = dict(mixed_kernel.GEMV1, SPLIT=4)
    assert all(torch.equal(a, b) for a, b in zip(m.one_token_lists(gemv, cpu), m.split_units(4, cpu)))
    gl = dict(mixed_kernel.GEMV1_GLUON, SPLIT=6)
    units, table = m.one_token_lists(gl, cpu)
    assert table is m.part_table(6, cpu, gl["XT"], columns=True)[1] and table.shape[1] > 16
    assert m.one_token_lists(dict(gl, GATHER=False), cpu)[1] is m.part_table(6, cpu, gl["XT"])[1]
    assert m.one_token_lists(dict(gl, PK=False, STEP_COST=3.0), cpu)[1] is m.part_table(6, cpu, gl["XT"], 3.0)[1]


def test_part_table_tensor_int32_columns():
    """Column orders stored as int32 (models past 32767 inputs) ride in the table one a word."""
    from mixed_linear import part_table_tensor
    units = [[0, 40, 3, 0, 0, 2, 0, 0], [40, 64, 3, 1, 0, 2, 0, 0], [64, 96, 5, 2, 6, 1, 64, 0]]
    kcols = torch.arange(96, dtype=torch.int32).flip(0) + 40000
    t = part_table_tensor(units, [0, 2, 3], "cpu", kcols)
    assert t.shape == (2, 16 + 64) and t.dtype == torch.int32
    assert torch.equal(t[0, 16:], kcols[:64]) and torch.equal(t[1, 16:48], kcols[64:96]) and not t[1, 48:].any()


def test_gluon_group_refuses_what_it_cannot_address():
    """The Gluon kernel addresses the packed codes with 32-bit offsets: codes of 2**31 words or more, and
    steps other than one tile, are refused with a clear error before anything runs (meta tensors: no memory)."""
    pytest.importorskip("triton")
    import mixed_gemv
    import mixed_kernel
    meta = torch.device("meta")
    x = torch.empty(1, 4096, dtype=torch.float16, device=meta)
    small = torch.empty(8, dtype=torch.int32, device=meta)
    member = (small, torch.empty(1 << 31, dtype=torch.int32, device=meta), small, torch.empty(4, 16, dtype=torch.int32,
              device=meta), torch.empty(8, dtype=torch.int16, device=meta), small, 4096)
    with pytest.raises(ValueError, match="32 bits"):
        mixed_gemv.gemv_gl_group(x, [member], None, dict(mixed_kernel.GEMV1_GLUON))
    member = member[:1] + (small,) + member[2:]
    with pytest.raises(ValueError, match="TS 1"):
        mixed_gemv.gemv_gl_group(x, [member], None, dict(mixed_kernel.GEMV1_GLUON, TS=2))


@pytest.mark.parametrize("gluon", [True, False])
def test_pick_config_one_token(monkeypatch, gluon):
    """One token, 4096 columns or more: mixed_gemv's Gluon kernel where rows >= 2 x columns (12
    parts), columns >= 2 x rows with 4096 rows or more (32 parts), 4096 rows or more below rows x
    columns 2**26 (32 parts) or from it (16 parts), where the H200 measured it faster (gate/up, down, 7B's
    and 70B's square shapes), parts balanced by time where rows >= 2 x columns; else GEMV1.
    Without Gluon: 256 rows a program where rows >= 2 x columns (gate/up), else GEMV1."""
    pytest.importorskip("triton")
    import mixed_kernel
    monkeypatch.setattr(mixed_kernel, "has_gluon", lambda device=None: gluon)
    monkeypatch.setattr(mixed_kernel, "sm_count", lambda device=None: None)  # no trim to whole waves
    for N, K, split, rows in ((11008, 4096, 12, 256), (28672, 8192, 12, 256), (8192, 8192, 16, None),
                              (8192, 28672, 32, None), (4096, 4096, 32, 128), (4096, 11008, 32, 128),
                              (1024, 8192, None, 128), (1536, 576, None, 128), (8191, 4096, 32, 128), (2048, 4096, None, 128),
                              (24576, 2048, None, 128)):
        cfg = mixed_kernel.pick_config(1, N, K, torch.float16, device=torch.device("cuda", 0))
        if gluon and split:
            assert cfg == dict(mixed_kernel.GEMV1_GLUON, SPLIT=split, **({"STEP_COST": 3.0} if N >= 2 * K else {})), cfg
            import mixed_gemv  # its parts: one width each (at least 2), at most XT tiles
            assert mixed_kernel.gemv_launcher(cfg) == (mixed_gemv.gemv_gl, split, cfg["XT"])
            assert mixed_kernel.gemv_launcher(dict(cfg, SPLIT=1))[1] == 2
            continue
        assert mixed_kernel.gemv_launcher(cfg) == (mixed_kernel.gemv, cfg["SPLIT"], 0)
        assert cfg["GEMV"] and not cfg.get("GLUON"), (N, K, cfg)
        assert cfg["BLOCK_N"] == (rows or 128), (N, K, cfg)
        assert {k: v for k, v in cfg.items() if k != "BLOCK_N"} == \
            {k: v for k, v in mixed_kernel.GEMV1.items() if k != "BLOCK_N"}


def test_pick_config_switches_to_the_dense_path():
    pytest.importorskip("triton")
    import mixed_kernel
    N, K = 4096, 4096
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert not mixed_kernel.pick_config(mixed_kernel.DENSE_MIN_TOKENS - 1, N, K, dtype).get("DENSE")
        assert mixed_kernel.pick_config(1, N, K, dtype).get("GEMV")  # one token: gemv_kernel
        assert mixed_kernel.pick_config(mixed_kernel.DENSE_MIN_TOKENS, N, K, dtype)["DENSE"]
        assert mixed_kernel.pick_config(300, N, K, dtype)["DENSE"]
        assert not mixed_kernel.pick_config(300, N, K, dtype, dense=False).get("DENSE")  # the fused kernel, asked for
    fused = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, USE_DOT=True, GATHER=True, unit_k=1024, num_warps=4)
    mixed_kernel.TUNED[(N, K, 128, torch.float16)] = fused  # a tuning sweep may keep the fused kernel
    try:
        assert mixed_kernel.pick_config(128, N, K, torch.float16) is fused
    finally:
        del mixed_kernel.TUNED[(N, K, 128, torch.float16)]


# ---------------------------------------------------------------- linears that share an input
def test_group_shared_inputs_groups_the_siblings(tmp_path):
    """load_packed(keep_packed=True) groups q/k/v and gate/up of every layer (o and down stay alone);
    group_inputs=False leaves every linear alone; siblings that cannot share a launch are refused
    with the reason."""
    from mixed_linear import SharedInputGroup
    model, reports = compress_tiny("qwen2", torch.float16, None, seed=4)  # q/k/v with biases, o without
    packing.save_packed(model, tmp_path, reports=reports)
    fast = packing.load_packed(tmp_path, dtype=torch.float16, keep_packed=True)
    for layer in fast.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        assert a.q_proj.group is not None and a.q_proj.group.members == [a.q_proj, a.k_proj, a.v_proj]
        assert a.k_proj.group is a.q_proj.group and a.v_proj.group is a.q_proj.group
        assert mlp.gate_proj.group.members == [mlp.gate_proj, mlp.up_proj] and mlp.up_proj.group is mlp.gate_proj.group
        assert a.o_proj.group is None and mlp.down_proj.group is None
    alone = packing.load_packed(tmp_path, dtype=torch.float16, keep_packed=True, group_inputs=False)
    assert all(m.group is None for m in alone.modules() if isinstance(m, MixedBitLinear))
    a, mlp = alone.model.layers[0].self_attn, alone.model.layers[0].mlp
    assert "bias" in SharedInputGroup.incompatible([a.q_proj, a.o_proj])
    assert "features" in SharedInputGroup.incompatible([a.q_proj, mlp.down_proj])
    assert "2 or 3" in SharedInputGroup.incompatible([a.q_proj])
    with pytest.raises(ValueError, match="bias"):
        SharedInputGroup([a.q_proj, a.o_proj])


def test_shared_input_group_launches_once_per_input(monkeypatch):
    """The group's protocol (its one-launch kernel replaced by the members' dense products, since it
    runs on CUDA only): q, k, v called with one x launch once, in any order, and each gets its own
    product; a member called again, or with x changed in place, or with another tensor of the same
    values, launches again; two tokens, or a config other than the Gluon kernel, leave the members
    alone (None)."""
    import mixed_kernel
    from mixed_linear import SharedInputGroup
    C = 96
    mods = []
    for i, (R, widths) in enumerate(((64, [3, 5, 2, 7]), (32, [4, 2, 8]), (32, [6, 3]))):
        _, (tensors, info) = packed_linear(R, C, widths, None, torch.float32, seed=40 + i)
        bias = torch.randn(R, generator=torch.Generator().manual_seed(i))
        mods.append(MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=bias, dtype=torch.float32,
                                              device="cpu"))
    q, k, v = mods
    group = SharedInputGroup(mods)
    launches = []

    def fake_launch(self, x2, cfg):
        launches.append(x2.clone())
        return [F.linear(x2, m.dequantize(), m.bias) for m in self.members]

    monkeypatch.setattr(SharedInputGroup, "launch", fake_launch)
    monkeypatch.setattr(mixed_kernel, "group_config", lambda *a, **kw: dict(mixed_kernel.GEMV1_GLUON))

    def call(m, x):
        return group.output(m, x, x.reshape(-1, C))

    def ref(m, x):
        return F.linear(x.reshape(-1, C), m.dequantize(), m.bias)

    x = torch.randn(1, 1, C)
    for m in (k, q, v):
        assert torch.equal(call(m, x), ref(m, x))
    assert len(launches) == 1
    call(q, x)
    call(q, x)  # q's own output is never kept for it: a second call is a second launch
    assert len(launches) == 3
    x.add_(1.0)  # k's kept output was for the old x
    assert torch.equal(call(k, x), ref(k, x)) and len(launches) == 4
    xc = x.clone()
    assert torch.equal(call(v, xc), ref(v, x)) and len(launches) == 5  # another tensor, same values
    assert torch.equal(call(q, xc), ref(q, x)) and len(launches) == 5  # kept from the last launch
    with torch.inference_mode():  # no version counter: identity alone
        xi = torch.randn(1, C)
        assert torch.equal(call(v, xi), ref(v, xi)) and torch.equal(call(k, xi), ref(k, xi))
    assert len(launches) == 6
    assert call(q, torch.randn(2, C)) is None
    monkeypatch.setattr(mixed_kernel, "group_config", lambda *a, **kw: None)
    assert call(q, torch.randn(1, C)) is None and len(launches) == 6


def test_whole_waves(monkeypatch):
    """Parts trimmed where the programs would spill into a last wave under a quarter full (132
    multiprocessors x 4 programs = 528 slots): 7B q/k/v's 48 row tiles x 12 parts = 576 -> 11 parts (528),
    70B gate/up's 224 x 12 = 2688 -> 11 (2464, within 5 waves); full or nearly full waves and a single
    partial wave keep theirs; so do the configurations (group and single) built from the rule."""
    pytest.importorskip("triton")
    import mixed_kernel
    monkeypatch.setattr(mixed_kernel, "sm_count", lambda device=None: 132)
    monkeypatch.setattr(mixed_kernel, "has_gluon", lambda device=None: True)
    for split, row_tiles, want in ((12, 48, 11), (12, 224, 11), (12, 86, 12), (12, 40, 12), (32, 16, 32),
                                   (33, 16, 33), (16, 16, 16), (16, 34, 15), (2, 300, 2)):
        got = mixed_kernel.whole_waves(split, row_tiles)
        assert got == want, (split, row_tiles, got)
        waves, rest = divmod(row_tiles * got, 528)
        assert rest == 0 or rest >= 132 or waves == 0 or got == 2
    dev = torch.device("cuda", 0)
    assert mixed_kernel.group_config(12288, 4096, torch.float16, dev)["SPLIT"] == 11
    assert mixed_kernel.group_config(22016, 4096, torch.float16, dev)["SPLIT"] == 12
    assert mixed_kernel.pick_config(1, 4096, 11008, torch.float16, device=dev)["SPLIT"] == 32
    monkeypatch.setattr(mixed_kernel, "sm_count", lambda device=None: None)
    assert mixed_kernel.whole_waves(12, 48) == 12


@pytest.mark.parametrize("gluon", [True, False])
def test_group_config(monkeypatch, gluon):
    """Groups run as one launch with the Gluon kernel wherever it runs (12 parts from rows x inputs >=
    2**25, else 16: the faster of the two on each set the H200 measured; part tables with their columns
    from 4096 inputs, parts balanced by time where rows >= 2 x inputs), else their members apart; a TUNED
    entry wins (and one that is not the Gluon kernel keeps them apart)."""
    pytest.importorskip("triton")
    import mixed_kernel
    monkeypatch.setattr(mixed_kernel, "has_gluon", lambda device=None: gluon)
    monkeypatch.setattr(mixed_kernel, "sm_count", lambda device=None: None)  # no trim to whole waves
    dev = torch.device("cuda", 0)
    for N, K, split in ((12288, 4096, 12), (22016, 4096, 12), (10240, 8192, 12), (57344, 8192, 12),
                        (6144, 4096, 16), (960, 576, 16), (3072, 576, 16)):
        cfg = mixed_kernel.group_config(N, K, torch.float16, dev)
        wide = {"STEP_COST": 3.0} if N >= 2 * K else {}
        assert cfg == (dict(mixed_kernel.GEMV1_GLUON, SPLIT=split, PK=K >= 4096, **wide) if gluon else None), (N, K, cfg)
    key = (960, 576, 1, torch.float16)
    monkeypatch.setitem(mixed_kernel.TUNED, key, dict(mixed_kernel.GEMV1_GLUON, SPLIT=4))
    assert mixed_kernel.group_config(960, 576, torch.float16, dev)["SPLIT"] == 4
    monkeypatch.setitem(mixed_kernel.TUNED, key, dict(mixed_kernel.GEMV1))
    assert mixed_kernel.group_config(960, 576, torch.float16, dev) is None
