"""The fused mixed-width kernel (mixed_kernel.py) and the many-token dense path (dequant_kernel,
then cuBLAS) against the PyTorch path of MixedBitLinear and an exact float64 reference, on CUDA:
mixed widths 2..8, unstructured and 2:4 sparsity, GQA shapes, biases, 1 token (gemv_kernel), 4/16
(fused) and 32/128/300 (dense; the fused kernel forced too), fp16 and bf16 (and fp32) inputs.

    python -m pytest -q tests_gpu/test_mixed_kernel.py

Tolerances: the kernel multiplies the exactly decoded fp32 weights (scale * (q - zero), never
rounded to fp16) with fp32 accumulation and rounds the output once, so its error against float64
is the output rounding: half an ulp of the output dtype, ~2.8e-4 (fp16) / ~2.3e-3 (bf16) relative
rms. The PyTorch path rounds every weight to the model dtype first and then cuBLAS rounds the
output, so it is never closer; the kernel must stay within 2x the PyTorch path's error (summation
order differs from cuBLAS and atomics add the units in any order, which moves the last bit).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F


import mixed_kernel  # noqa: E402
import packing  # noqa: E402
from mixed_linear import MixedBitLinear  # noqa: E402
from test_mixed_linear import compress_tiny, packed_linear  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.float16: 6e-4, torch.bfloat16: 5e-3, torch.float32: 1e-6}
SHAPES = [  # (out, in, widths, pruning)
    (1024, 4096, [3, 5, 2, 7, 4, 4, 6, 3, 8, 5], None),  # GQA k/v of a 4096-wide model
    (4096, 1024, [2, 3, 4, 5, 6], "50%"),
    (768, 1000, [4, 2, 3, 7, 5, 3, 2, 6], "2:4"),  # in_features not a multiple of 32
    (64, 96, [3, 5, 2, 7, 4, 8, 6, 3], None),
]


FUSED_MANY = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, USE_DOT=True, GATHER=True, unit_k=1024, num_warps=4)
GEMV_VARIANTS = [dict(SPLIT=1), dict(SPLIT=4, TS=2), dict(SPLIT=16, BLOCK_N=64), dict(SPLIT=8, GATHER=False),
                 dict(BLOCK_M=2, SPLIT=3), dict(BLOCK_M=4, SPLIT=2), dict(SPLIT=16, INPLACE=1), dict(SPLIT=4, INPLACE=2),
                 dict(BLOCK_N=256), dict(SPLIT=8, INPLACE=0)]

# mixed_gemv (Gluon, one token): the measured candidate, direct store where a linear has one part, one row
# a thread with a deeper ring, x gathered first, parts capped at 4 tiles (many parts, units cut by the cap),
# 8 warps; the part table without its columns (PK False, as groups of fewer than 4096 inputs run), also with
# capped parts; the shortest ring
GLUON = mixed_kernel.GEMV1_GLUON
GLUON_VARIANTS = [dict(), dict(SPLIT=1), dict(NS=4, BLOCK_N=128), dict(GATHER=False), dict(XT=4, SPLIT=2),
                  dict(BLOCK_N=512, num_warps=8, NS=6), dict(PK=False), dict(PK=False, XT=4, SPLIT=2),
                  dict(NS=4, BLOCK_N=128, SPLIT=8), dict(NS=2, SPLIT=24)]


def captured(module, static_x: torch.Tensor):
    """(CUDA graph of module(static_x), its output tensor), after a warm-up call outside the
    capture (compilation, work lists, tables, the dense buffer)."""
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        module(static_x)
        with torch.cuda.graph(g):
            out = module(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    return g, out


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def kernel_configs(layers) -> list[tuple[dict, torch.dtype]]:
    """The kernel configurations (and input dtypes) the tests below launch, with the width masks
    of their modules: what `compiled_ahead` compiles."""
    masks = sorted({MixedBitLinear.from_parts(parts, bias=None, dtype=torch.float16, device="cpu").wmask
                    for parts, _, _ in layers.values()})
    items = []
    for dt in (torch.float16, torch.bfloat16):
        for M in (1, 4, 16, 128):
            c = mixed_kernel.pick_config(M, 1024, 1024, dt, dense=False)
            items += [(dict(c, WMASK=m), dt) for m in masks] if c.get("GEMV") else [(c, dt)]
        items += [(mixed_kernel.DENSE, dt), (FUSED_MANY, dt)]
    items += [(dict(mixed_kernel.GEMV1, WMASK=m, **v), torch.float16) for v in GEMV_VARIANTS for m in masks]
    if mixed_kernel.has_gluon():
        items += [(dict(GLUON, WMASK=m, **v), torch.float16) for v in GLUON_VARIANTS for m in masks]
        items += [(dict(GLUON, WMASK=m), dt) for m in masks for dt in (torch.bfloat16, torch.float32)]
    return items


@pytest.fixture(scope="module", autouse=True)
def compiled_ahead(layers):
    """Compile the configurations first, in parallel processes (`mixed_kernel.warm_up`, into
    Triton's disk cache): the tests then load binaries instead of compiling ~100 of them one after
    another. Only a speed-up: where it fails, the tests compile as they go."""
    try:
        mixed_kernel.warm_up(kernel_configs(layers), processes=min(16, os.cpu_count() or 1))
    except Exception as e:  # noqa: BLE001 (any failure here only costs time)
        warnings.warn(f"compiling ahead failed ({type(e).__name__}: {e}); the tests compile as they go")


@pytest.fixture(scope="module")
def layers():
    """case index -> (module on CUDA, exact fp32 weight on CUDA, bias)."""
    out = {}
    for i, (R, C, widths, prune) in enumerate(SHAPES):
        W, (tensors, info) = packed_linear(R, C, widths, prune, torch.float32, seed=100 + i)
        bias = torch.randn(R, generator=torch.Generator().manual_seed(i))
        parts = packing.decode_parts(tensors, info)
        out[i] = parts, W.cuda(), bias.cuda()
    return out


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("M", [1, 4, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference(layers, case, M, dtype):
    parts, W, bias = layers[case]
    R, C = W.shape
    m = MixedBitLinear.from_parts(parts, bias=bias.to(dtype), dtype=dtype, device="cuda")
    m.tune = mixed_kernel.pick_config(M, R, C, dtype, dense=False)  # the fused kernel at every count
    x = torch.randn(M, C, device="cuda").to(dtype)
    exact = F.linear(x.double(), W.double(), bias.to(dtype).double())  # W: the fp32 decode, exact
    torch_path = F.linear(x, m.dequantize(), m.bias)  # the CPU path's arithmetic, on the GPU
    y = m(x)
    assert y.dtype == dtype and y.shape == (M, R) and bool(torch.isfinite(y).all())
    err, err_torch = rel(y, exact), rel(torch_path, exact)
    assert err < TOL[dtype], (err, err_torch)
    assert err <= 2 * err_torch + 1e-7, (err, err_torch)
    ws, cnt = mixed_kernel._WORKSPACE[y.device]
    assert not ws.any() and not cnt.any()  # the kernel leaves its workspace clean for the next call




@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("M", [32, 128, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_path_matches_reference(layers, case, M, dtype):
    """From DENSE_MIN_TOKENS tokens the forward decodes W (dequant_kernel) and calls cuBLAS: the
    decode equals dequantize() bit for bit, the output the PyTorch path's to its rounding; the
    fused kernel, forced, still agrees at these token counts."""
    parts, W, bias = layers[case]
    R, C = W.shape
    m = MixedBitLinear.from_parts(parts, bias=bias.to(dtype), dtype=dtype, device="cuda")
    assert mixed_kernel.pick_config(M, R, C, dtype).get("DENSE")
    x = torch.randn(M, C, device="cuda").to(dtype)
    exact = F.linear(x.double(), W.double(), bias.to(dtype).double())
    torch_path = F.linear(x, m.dequantize(), m.bias)
    y = m(x)
    assert y.dtype == dtype and y.shape == (M, R) and bool(torch.isfinite(y).all())
    Wk = mixed_kernel.dense_workspace(y.device, dtype, R, C)  # the decode the forward used
    assert torch.equal(Wk.view(torch.int16), m.dequantize()[:, m.kcols[:C].long()].view(torch.int16))
    err, err_torch = rel(y, exact), rel(torch_path, exact)
    assert err < TOL[dtype], (err, err_torch)
    assert err <= 2 * err_torch + 1e-7, (err, err_torch)
    m.tune = FUSED_MANY
    err_fused = rel(m(x), exact)
    assert err_fused < TOL[dtype] and err_fused <= 2 * err_torch + 1e-7, (err_fused, err_torch)


def test_dense_path_fp32_3d_noncontiguous_and_cuda_graph(layers):
    parts, W, bias = layers[2]  # in_features 1000: a padded last tile
    m = MixedBitLinear.from_parts(parts, bias=bias, dtype=torch.float32, device="cuda", saved_dtype=torch.float32)
    x = torch.randn(40, 3, W.shape[1], device="cuda").transpose(0, 1)  # (3, 40, C), not contiguous
    y = m(x)
    assert y.shape == (3, 40, W.shape[0]) and y.dtype == torch.float32
    assert rel(y, F.linear(x.double(), W.double(), bias.double())) < TOL[torch.float32]
    mh = MixedBitLinear.from_parts(parts, bias=bias.half(), dtype=torch.float16, device="cuda")
    static_x = torch.randn(64, W.shape[1], device="cuda").half()
    g, out = captured(mh, static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        assert rel(out, F.linear(static_x.double(), W.double(), bias.half().double())) < TOL[torch.float16]


def test_fp32_inputs_no_bias_and_3d_noncontiguous(layers):
    parts, W, _ = layers[0]
    m = MixedBitLinear.from_parts(parts, bias=None, dtype=torch.float32, device="cuda", saved_dtype=torch.float32)
    x = torch.randn(5, 3, W.shape[1], device="cuda").transpose(0, 1)  # (3, 5, C), not contiguous
    y = m(x)
    assert y.shape == (3, 5, W.shape[0]) and y.dtype == torch.float32
    assert rel(y, F.linear(x.double(), W.double())) < TOL[torch.float32]


def test_repeat_and_cuda_graph(layers):
    """Calls in a row and replays of a captured graph agree to the last bit or so (atomics add the
    units in any order)."""
    parts, W, bias = layers[1]
    m = MixedBitLinear.from_parts(parts, bias=bias.half(), dtype=torch.float16, device="cuda")
    m.tune = mixed_kernel.pick_config(4, *W.shape, torch.float16, dense=False)  # the fused kernel's atomics
    x = torch.randn(4, W.shape[1], device="cuda").half()
    first = m(x)
    for _ in range(3):
        assert (m(x).float() - first.float()).abs().max() <= 2e-3 * first.float().abs().max()
    static_x = x.clone()
    g, out = captured(m, static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        ref = F.linear(static_x.double(), W.double(), bias.half().double())
        assert rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("variant", GEMV_VARIANTS)
def test_gemv_variants(layers, case, variant):
    """gemv_kernel's tuning space: direct store (SPLIT 1) and split-K, smaller steps and rows, x
    gathered first, its 2-4 token path (pick_config does not choose that one yet) and the in-place
    decode (INPLACE 1: widths 2 and 4; 2: every width, the default; 0: every code shifted and masked)
    and 256 rows a program (the default for wide shapes); graph replays of the split-K form leave the
    workspace clean."""
    check_few_tokens(layers[case], dict(mixed_kernel.GEMV1, **variant))


def check_few_tokens(layer, cfg: dict) -> None:
    """A module run by configuration cfg (BLOCK_M tokens, 3 for 4) equals the exact product within
    the fp16 tolerance and 2x the PyTorch path's error, in calls and graph replays, and leaves the
    split-K workspace clean."""
    parts, W, bias = layer
    m = MixedBitLinear.from_parts(parts, bias=bias.half(), dtype=torch.float16, device="cuda")
    m.tune = cfg
    x = torch.randn(m.tune["BLOCK_M"] - (m.tune["BLOCK_M"] == 4), W.shape[1], device="cuda").half()  # 1, 2, 3 tokens
    exact = F.linear(x.double(), W.double(), bias.half().double())
    torch_path = F.linear(x, m.dequantize(), m.bias)
    err, err_torch = rel(m(x), exact), rel(torch_path, exact)
    assert err < TOL[torch.float16] and err <= 2 * err_torch + 1e-7, (err, err_torch)
    static_x = x.clone()
    g, out = captured(m, static_x)
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        assert rel(out, F.linear(static_x.double(), W.double(), bias.half().double())) < TOL[torch.float16]
    assert_workspace_clean(out.device)


def assert_workspace_clean(device: torch.device) -> None:
    """The split-K workspace and tile counters of `device` are all zero, as every launch must leave
    them (none exist yet if only one-part launches ran so far)."""
    torch.cuda.synchronize()
    for buf in mixed_kernel._WORKSPACE.get(device, ()):
        assert not buf.any()


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("variant", GLUON_VARIANTS)
def test_gluon_gemv_variants(layers, case, variant):
    """mixed_gemv's kernel against the exact product, as test_gemv_variants: mixed widths 2..8 (its
    parts one width each, at most XT tiles), pruning, GQA shapes, biases, a padded last tile; graph
    replays; the split-K workspace left clean."""
    if not mixed_kernel.has_gluon():
        pytest.skip("this Triton has no Gluon")
    check_few_tokens(layers[case], dict(GLUON, **variant))


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gluon_gemv_dtypes(layers, case, dtype):
    """bf16 and fp32 inputs (fp32 scales where the module is fp32), no bias, a 3-d input. fp32 is held
    to TOL only: y = s (sum q x - z sum x) cancels in fp32 (as in gemv_kernel), 5.0e-7 against the
    PyTorch path's 2.0e-7 on case 0 (H200), both far inside fp32's 1e-6."""
    if not mixed_kernel.has_gluon():
        pytest.skip("this Triton has no Gluon")
    parts, W, _ = layers[case]
    saved = torch.float32 if dtype == torch.float32 else dtype
    m = MixedBitLinear.from_parts(parts, bias=None, dtype=dtype, device="cuda", saved_dtype=saved)
    m.tune = dict(GLUON)
    x = torch.randn(1, 1, W.shape[1], device="cuda").to(dtype)
    y = m(x)
    assert y.shape == (1, 1, W.shape[0]) and y.dtype == dtype
    exact = F.linear(x.double(), W.double())
    err, err_torch = rel(y, exact), rel(F.linear(x, m.dequantize()), exact)
    assert err < TOL[dtype] and (dtype == torch.float32 or err <= 2 * err_torch + 1e-7), (err, err_torch)


GROUPS = [  # in_features, members (out, widths, pruning), bias
    (1000, [(768, [4, 2, 3, 7, 5], None), (256, [3, 5, 2, 8], "50%"), (256, [6, 2, 4], "2:4")], True),  # GQA q/k/v
    (4096, [(1536, [2, 3, 4, 5], None), (1536, [3, 4, 6], None)], False),  # gate/up
]


@pytest.mark.parametrize("case", range(len(GROUPS)))
@pytest.mark.parametrize("variant", [dict(), dict(SPLIT=1), dict(XT=4, SPLIT=2), dict(BLOCK_N=128, num_warps=2,
                                                                                     SPLIT=32),
                                     dict(PK=False), dict(PK=False, XT=4, SPLIT=2)])
def test_shared_input_group_in_one_launch(case, variant):
    """mixed_linear.SharedInputGroup: linears of different shapes, widths, pruning and biases that read
    one x run as one launch of gemv_gl_group (the members' outputs are views of one tensor), called
    in any order; each equals its exact product within the fp16 tolerance and 2x the PyTorch path's
    error, in calls and graph replays with new inputs; the split-K workspace is left clean."""
    if not mixed_kernel.has_gluon():
        pytest.skip("this Triton has no Gluon")
    from mixed_linear import SharedInputGroup
    K, specs, with_bias = GROUPS[case]
    mods, exact = [], []
    for i, (R, widths, prune) in enumerate(specs):
        W, (tensors, info) = packed_linear(R, K, widths, prune, torch.float32, seed=200 + 10 * case + i)
        bias = torch.randn(R, generator=torch.Generator().manual_seed(i)).half().cuda() if with_bias else None
        m = MixedBitLinear.from_parts(packing.decode_parts(tensors, info), bias=bias, dtype=torch.float16,
                                      device="cuda")
        mods.append(m)
        exact.append((W.cuda().double(), None if bias is None else bias.double()))
    group = SharedInputGroup(mods)
    group.tune = dict(GLUON, **variant)
    x = torch.randn(1, K, device="cuda").half()
    outs = {i: mods[i](x) for i in reversed(range(len(mods)))}  # the last member launches for all
    assert len({o.untyped_storage().data_ptr() for o in outs.values()}) == 1
    for i, m in enumerate(mods):
        ref = F.linear(x.double(), *exact[i])
        err, err_torch = rel(outs[i], ref), rel(F.linear(x, m.dequantize(), m.bias), ref)
        assert err < TOL[torch.float16] and err <= 2 * err_torch + 1e-7, (i, err, err_torch)
    static_x = x.clone()
    g, out = captured(lambda z: torch.cat([m(z) for m in mods], 1), static_x)
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        ref = torch.cat([F.linear(static_x.double(), *e) for e in exact], 1)
        assert rel(out, ref) < TOL[torch.float16]
    assert_workspace_clean(out.device)


def test_grouped_model_decodes_as_the_members_alone(tmp_path):
    """A tiny model loaded with its q/k/v and gate/up grouped (forced onto the group launch, which
    pick_config gives only from 4096 inputs) decodes token by token (KV cache, one token a step) to
    the logits of the same model with every linear alone, within fp16 rounding."""
    if not mixed_kernel.has_gluon():
        pytest.skip("this Triton has no Gluon")
    model, reports = compress_tiny("qwen2", torch.float16, None, seed=5)
    packing.save_packed(model, tmp_path, reports=reports)
    grouped = packing.load_packed(tmp_path, dtype=torch.float16, device="cuda", keep_packed=True)
    alone = packing.load_packed(tmp_path, dtype=torch.float16, device="cuda", keep_packed=True, group_inputs=False)
    groups = {id(m.group): m.group for m in grouped.modules() if isinstance(m, MixedBitLinear) and m.group}
    assert len(groups) == 2 * len(grouped.model.layers)
    for grp in groups.values():
        grp.tune = dict(GLUON)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a = grouped.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        b = alone.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
    la, lb = torch.stack(a.logits).float(), torch.stack(b.logits).float()
    assert rel(la, lb.double()) < 2e-3
    assert torch.equal(a.sequences, b.sequences)


def test_load_packed_on_cuda_runs_the_kernel(tmp_path):
    """A whole tiny model: packed runtime on CUDA against the dense decode on CUDA."""
    model, reports = compress_tiny("qwen2", torch.float16, "50%", seed=3)
    packing.save_packed(model, tmp_path, reports=reports, pruned=True)
    dense = packing.load_packed(tmp_path, dtype=torch.float16, device="cuda")
    fast = packing.load_packed(tmp_path, dtype=torch.float16, device="cuda", keep_packed=True)
    assert all(m.qweight.is_cuda for m in fast.modules() if isinstance(m, MixedBitLinear))
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, b = dense(ids).logits.float(), fast(ids).logits.float()
    # the dense model holds fp16-rounded weights, the kernel the exact ones: ~1e-3 apart per layer
    assert rel(b, a.double()) < 1e-2
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.9
