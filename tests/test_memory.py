"""Memory of one layer's compression, measured on the CPU with the profiler's allocation
events: MI mode (MI matrix, clustering, allocation errors) peaks no higher than SparseGPT
mode on the same layer, and --n_groups auto (a permuted copy for one cluster, the trial solves'
copy of the Hessian) at most 1.5 C x C buffers higher. The GPU has the same buffers (bench/scale.py measures it there);
the extra ones MI mode had were the off-diagonal MI values gathered at once (four C x C
buffers with the mask's indices) and whole-matrix temporaries."""
from __future__ import annotations

import json

import torch

from compress import compress_layer
from config import CompressConfig
from layerwise import Team
from model_io import ARCHS


def _peak_allocated(cfg: CompressConfig, tmp_path) -> int:
    """Peak bytes the CPU allocator holds (beyond what existed before) while compress_layer runs
    on a LLaMA layer whose widest input (FFN 1024) makes the C x C buffers dominate."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    lc = LlamaConfig(hidden_size=64, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4,
                     num_hidden_layers=1)
    lc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(lc, 0)
    inps = torch.randn(4, 64, 64)
    pos = torch.arange(64)[None]
    kwargs = {"attention_mask": None, "position_ids": pos, "position_embeddings": LlamaRotaryEmbedding(lc)(inps, pos)}
    team = Team([torch.device("cpu")], [inps], [kwargs], 4, [layer])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        compress_layer(team, 0, ARCHS["llama"], cfg)
    trace = tmp_path / f"{cfg.use_mi_grouping}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_mi_mode_peaks_no_higher_than_sparsegpt_mode(tmp_path):
    sparse = _peak_allocated(CompressConfig(use_mi_grouping=False, sparsity=0.5), tmp_path)
    mi = _peak_allocated(CompressConfig(sparsity=0.5, wbits=4, target_avg_bits=4.0, n_groups=10), tmp_path)
    C2 = 1024 * 1024 * 4  # one C x C fp32 buffer of the widest linear
    assert sparse > 2 * C2  # the measure sees the solver's C x C buffers
    assert mi <= sparse + C2 // 8, f"MI mode {mi / C2:.2f} C^2, SparseGPT mode {sparse / C2:.2f} C^2"
    # --n_groups auto: the one-cluster plan's Hessian block is a permuted C x C copy, and the trial
    # solves work on a copy of the Hessian beside it; measured 4.11 C^2 choosing by the proxy,
    # 4.56 with trial solves, against 3.22 (min-max grids here: auto can choose one 1024-column run,
    # and the MSE search over it works in pieces of 2^22 values, ~40 MB of temporaries whatever C,
    # which on this small layer is 10 C^2)
    auto = _peak_allocated(CompressConfig(sparsity=0.5, wbits=4, target_avg_bits=4.0, bits_budget="stored",
                                          n_groups=0, n_groups_max=8, clip="minmax"), tmp_path)
    assert auto <= sparse + 3 * C2 // 2, f"auto {auto / C2:.2f} C^2, SparseGPT mode {sparse / C2:.2f} C^2"


def _solve_peak(spill: bool, C: int = 512) -> float:
    """Peak bytes allocated while a solver is filled and solves one linear, in C x C fp32 buffers."""
    from torch.profiler import ProfilerActivity, profile
    from sparsegpt_mi import LinearSolver
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(1024, C, generator=g), torch.randn(32, C, generator=g)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        solver = LinearSolver(C, torch.device("cpu"))
        solver.add_batch(X[None])
        solver.solve([W], [torch.arange(C)], [[4]], sparsity=0.5, spill=spill)
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "t.json"
        prof.export_chrome_trace(str(trace))
        mem = [e["args"]["Total Allocated"] for e in json.loads(trace.read_text())["traceEvents"]
               if e.get("name") == "[memory]"]
    return max(mem) / (C * C * 4)


def test_spilled_solve_holds_one_hessian_sized_buffer_less():
    """spill (the GPU default from 8192 columns): H is freed once factored and its factor kept
    in its place, so the factorization holds two C x C buffers where the plain path holds three
    (H, its factor, the inverse), and nothing goes to host memory."""
    plain, spilled = _solve_peak(False), _solve_peak(True)
    assert plain > 3, plain  # the measure sees the three buffers (and the statistics around them)
    assert spilled < plain - 0.85, (plain, spilled)


def test_finiteness_check_of_the_activations_needs_no_activation_sized_buffer(tmp_path):
    """Team.finite (after every layer) answers like isfinite(x).all() for every float dtype, the
    largest finite values included, without isfinite's one byte per element (1 GiB for a 7B run's
    activations, which the whole-model run held on top of its peak)."""
    from torch.profiler import ProfilerActivity, profile
    from layerwise import all_finite
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.full((64, 64, 64), torch.finfo(dt).max, dtype=dt)
        x[1::2] = -torch.finfo(dt).max
        assert all_finite(x)
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[5, 6, 7] = bad
            assert not all_finite(y) and not Team([torch.device("cpu")], [x, y], [{}, {}]).finite()
    x = torch.randn(16, 1024, 1024)  # 64 MiB
    team = Team([torch.device("cpu")], [x], [{}])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert team.finite()
    trace = tmp_path / "finite.json"
    prof.export_chrome_trace(str(trace))
    allocated = [e["args"]["Total Allocated"] for e in json.loads(trace.read_text())["traceEvents"]
                 if e.get("name") == "[memory]"]
    # what the check allocates beyond what was there (isfinite would take 16 MiB + a 64 MiB |x| here)
    assert max(allocated) - min(allocated) < x.numel() // 64, max(allocated) - min(allocated)
