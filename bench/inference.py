"""Inference from packed checkpoints (mixed_linear.MixedBitLinear and its Triton kernel) against fp16.

    python -m bench.inference --parts warm kernels                             # (1) on a CUDA GPU
    python -m bench.inference --parts kernels --models llama2-7b --settings 3.5 --tokens 16 32 128   # a short (1)
    python -m bench.inference --parts model --packed DIR --eval wiki.txt       # (2) and (3)
    python -m bench.inference --parts warm kernels model --packed DIR --eval wiki.txt

(1) Kernels: per-linear and per-layer (the 7 linears) time of MixedBitLinear against fp16
    F.linear (cuBLAS) on LLaMA-2-7B (4096/11008) and 70B (8192/28672, k/v 1024 rows) shapes at
    1, 4, 16 and 128 tokens (--tokens), at 3.0, 3.5 and 4.0 stored bits and at 4.0 bits + 50% sparsity.
    Each call times the module as the forward runs it: at one token gemv_kernel or mixed_gemv's Gluon kernel, then below
    mixed_kernel.DENSE_MIN_TOKENS tokens the fused kernel, from there on the dense path (dequant_kernel into a buffer, then cuBLAS);
    the tables say which ran. The layer is also timed in model order (MODEL_ORDER: q/k/v on one input,
    gate/up on one, a small stand-in kernel wherever the model runs others, subtracted from both
    sides), and at one token with q/k/v and gate/up each one launch (mixed_linear.SharedInputGroup),
    against fp16 as the model runs it and with q/k/v and gate/up concatenated (FUSED_ORDER).
    Synthetic linears: 10 channel clusters of random sizes (0.5-1.5x the mean) in a random
    permutation; widths per target as an allocation spreads them (3.0: 2,2,2,3,3,3,3,4,4,4;
    3.5: 2,2,3,3,3,4,4,4,5,5; 4.0: 2,3,3,4,4,4,4,5,5,6), assigned to clusters so that the
    average is closest to the target; random codes, scales and zero points. The fused kernel's
    configuration is picked per shape and token count by timing a few candidates (the table
    says which); the dense path takes pick_config's. Timing: CUDA graphs of one pass over
    enough copies of the weights that they
    do not fit in L2 (>= 256 MB per pass), CUDA events, warm-up, median of 15 replays.
(2) Memory: GPU bytes of a packed model loaded with keep_packed=True against fp16, and of its
    compressed linears against their stored bytes in the packed save.
(3) Quality: perplexity (layerwise.perplexity, windows of --seqlen tokens of --eval) and greedy
    generation (64 tokens, three prompts) of the packed runtime against the dense decode
    (`packing.load_packed(DIR)`, bit for bit the fake save).

Writes bench/results/inference-<device>-<date>.json and .md (or --out); the commit is the env
var GIT_COMMIT if set (a copy's git metadata can be stale), else `git rev-parse HEAD`.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mixed_kernel
import packing
from datautils import get_eval_tokens
from layerwise import perplexity
from mixed_linear import MixedBitLinear, SharedInputGroup, width_mask
from model_io import ARCHS, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # model -> linear -> (out, in)
    "llama2-7b": {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                  "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "llama2-70b": {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
                   "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672)},
}
WIDTHS = {3.0: [2, 2, 2, 3, 3, 3, 3, 4, 4, 4], 3.5: [2, 2, 3, 3, 3, 4, 4, 4, 5, 5], 4.0: [2, 3, 3, 4, 4, 4, 4, 5, 5, 6]}
SETTINGS = {"3.0": (3.0, 0.0), "3.5": (3.5, 0.0), "4.0": (4.0, 0.0), "4.0+50%": (4.0, 0.5)}
TOKENS = (1, 4, 16, 128)
# a decoder layer's linears in the order the model runs them; None: the other kernels in between
# (attention, residual add and norm, SiLU, the gate product), stood in for by one small kernel each
MODEL_ORDER = ("q_proj", "k_proj", "v_proj", None, "o_proj", None, "gate_proj", None, "up_proj", None, "down_proj", None)
# the same with q/k/v and gate/up each one product (fp16: weights concatenated, as fused runtimes hold them)
FUSED_ORDER = ("qkv", None, "o_proj", None, "gate_up", None, None, "down_proj", None)
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
PASS_BYTES = 256 << 20  # weights touched per timed pass: several times the 50 MB L2
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Explain in simple words why the sky is blue.")


# ---------------------------------------------------------------- synthetic packed linears
def synthetic_parts(R: int, C: int, target: float, sparsity: float, seed: int, device) -> dict:
    """decode_parts-style content of a random linear: 10 clusters, widths spread around target."""
    g = torch.Generator().manual_seed(seed)
    widths = WIDTHS[target]
    sizes = torch.rand(len(widths), generator=g) + 0.5
    sizes = (sizes / sizes.sum() * C).floor().long()
    sizes[-1] += C - int(sizes.sum())
    best, best_avg = None, None
    for _ in range(300):  # the assignment of widths to clusters whose average is closest to the target
        w = torch.tensor(widths)[torch.randperm(len(widths), generator=g)]
        avg = float((w * sizes).sum()) / C
        if best is None or abs(avg - target) < abs(best_avg - target):
            best, best_avg = w, avg
    runs, s = [], 0
    for n, b in zip(sizes.tolist(), best.tolist()):
        runs.append((s, s + n, b))
        s += n
    gd = torch.Generator(device=device).manual_seed(seed)
    codes = torch.empty(R, C, dtype=torch.int32, device=device)
    zero = torch.empty(R, len(runs), device=device)
    for j, (s, e, b) in enumerate(runs):
        codes[:, s:e] = torch.randint(0, 2 ** b, (R, e - s), generator=gd, device=device, dtype=torch.int32)
        zero[:, j] = torch.randint(0, 2 ** b, (R,), generator=gd, device=device).float()
    keep = None
    if sparsity:
        keep = torch.rand(R, C, generator=gd, device=device) >= sparsity
        zc = torch.cat([zero[:, j:j + 1].expand(R, e - s) for j, (s, e, _) in enumerate(runs)], 1).int()
        codes = torch.where(keep, codes, zc)  # dense codes: a pruned weight is its zero point
    scale = (torch.rand(R, len(runs), generator=gd, device=device) * 2e-3 + 1e-4).half().float()  # fp16, as saved
    return {"codes": codes, "keep": keep, "scale": scale, "zero": zero,
            "perm": torch.randperm(C, generator=g), "runs": runs, "avg_bits": best_avg}


def synthetic_linear(R: int, C: int, target: float, seed: int, device) -> MixedBitLinear:
    """A fp16 `MixedBitLinear` of `synthetic_parts` (no sparsity, no bias)."""
    return MixedBitLinear.from_parts(synthetic_parts(R, C, target, 0.0, seed=seed, device=device), bias=None,
                                     dtype=torch.float16, device=device)


# ---------------------------------------------------------------- timing
def graph_time(calls: list, reps: int = 15, warm: int = 3) -> float:
    """Median seconds of one pass over `calls` (zero-argument callables), captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:  # compile, build work lists, grow the workspace: outside the capture
            f()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for f in calls:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(warm):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del g
    return statistics.median(times)


def model_order_time(layers: list[dict], xs: dict, run, order: tuple = MODEL_ORDER) -> float:
    """Median seconds of one layer, the linears in `order` with a small stand-in kernel (an in-place
    multiply of a hidden-sized vector) where the model runs other kernels, each linear on its input in
    xs (q, k and v share one, as gate and up do, as in the model; `FUSED` names read their first
    member's). run(w, x): one linear."""
    stand_in = _stand_in(xs["q_proj"])
    calls = [stand_in if n is None else (lambda w=layer[n], x=xs[FUSED[n][0] if n in FUSED else n]: run(w, x))
             for layer in layers for n in order]
    return graph_time(calls) / len(layers)


def _stand_in(x: torch.Tensor):
    """The stand-in kernel of `model_order_time`: an in-place multiply of a vector as wide as x."""
    sep = torch.ones(1, x.shape[1], device=x.device, dtype=x.dtype)
    return lambda: sep.mul_(1.0)


def shared_inputs(M: int, shapes: dict, dev, dt) -> dict:
    """Inputs per linear: q/k/v one tensor, gate/up one, o and down their own."""
    xa, xm = torch.randn(M, shapes["q_proj"][1], device=dev, dtype=dt), torch.randn(M, shapes["gate_proj"][1],
                                                                                     device=dev, dtype=dt)
    return {"q_proj": xa, "k_proj": xa, "v_proj": xa, "o_proj": torch.randn(M, shapes["o_proj"][1], device=dev, dtype=dt),
            "gate_proj": xm, "up_proj": xm, "down_proj": torch.randn(M, shapes["down_proj"][1], device=dev, dtype=dt)}


def stand_in_time(x: torch.Tensor, n_layers: int) -> float:
    """Median seconds of the stand-in kernels of one layer alone (`model_order_time`)."""
    return graph_time([_stand_in(x)] * (MODEL_ORDER.count(None) * n_layers)) / n_layers


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(PASS_BYTES / nbytes)))


def candidates(M: int) -> list[dict]:
    """Kernel configurations tried per (shape, tokens); unit_k is a run-time choice (no recompile)."""
    fma = dict(BLOCK_M=1, BLOCK_K=64, USE_DOT=False, GATHER=True, num_warps=1)
    if M == 1:  # gemv_kernel around its default, and the fused kernel's best of 2026-11-30
        g = mixed_kernel.GEMV1
        # the Gluon kernel; 128 rows / 2 warps with many parts for the short, wide shapes (70B k/v, 1024x8192, ran
        # 0.79x of fp16 with every candidate above: 4-8 row tiles leave most SMs idle; 10.3-10.6 us with these
        # against 12.4, inference-…-pdl-70b.md and -grouped.md)
        gl = [dict(mixed_kernel.GEMV1_GLUON, SPLIT=sp) for sp in (12, 16, 24)] + [
            dict(mixed_kernel.GEMV1_GLUON, BLOCK_N=128, num_warps=2, SPLIT=sp) for sp in (32, 48)] \
            if mixed_kernel.has_gluon() else []
        return [dict(g)] + [dict(g, BLOCK_N=bn, TS=ts, SPLIT=sp) for bn, ts, sp in (
            (128, 2, 8), (128, 2, 24), (128, 1, 16), (128, 4, 8), (64, 1, 32), (256, 2, 16))] + [
            dict(fma, BLOCK_N=64, unit_k=128)] + gl
    dot16 = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, USE_DOT=True, GATHER=True, num_warps=4)
    if M <= 16:
        out = [dict(dot16, unit_k=512), dict(dot16, unit_k=256), dict(dot16, unit_k=1024),
               dict(dot16, BLOCK_N=128, unit_k=512)]
        return out + ([dict(fma, BLOCK_N=128, unit_k=256)] if M <= 4 else [])
    dot64 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, USE_DOT=True, GATHER=True, num_warps=4)
    return [dict(dot64, unit_k=1024), dict(dot64, unit_k=512), dict(dot64, unit_k=2048),
            dict(dot64, BLOCK_N=128, num_warps=8, unit_k=1024)]


def cfg_name(c: dict) -> str:
    if c.get("GLUON"):
        return f"gluon n{c['BLOCK_N']} ts{c['TS']} split{c['SPLIT']} ns{c['NS']} w{c['num_warps']}"
    if c.get("GEMV"):
        ip = f" inplace{int(c['INPLACE'])}" if c.get("INPLACE") else ""
        return f"gemv n{c['BLOCK_N']} ts{c['TS']} split{c['SPLIT']} w{c['num_warps']}{ip}"
    kind = f"dot{c['BLOCK_M']}" if c["USE_DOT"] else "fma"
    return f"{kind} n{c['BLOCK_N']} k{c['BLOCK_K']} w{c['num_warps']} u{c['unit_k']}{'' if c['GATHER'] else ' pregather'}"


def path_name(c: dict) -> str:
    return "dense" if c.get("DENSE") else ("gemv" if c.get("GEMV") else "fused")


def bench_kernels(dev, log, models: list[str], settings: list[str], tokens: list[int]) -> dict:
    out: dict = {"settings": {}, "tuned": {}, "dense_min_tokens": mixed_kernel.DENSE_MIN_TOKENS}
    dt = torch.float16
    for model in models:
        shapes = SHAPES[model]
        # fp16 baseline: random dense weights, copies so that a pass streams from HBM
        dense_layer_bytes = sum(2 * r * c for r, c in shapes.values())
        n_layers = copies_for(dense_layer_bytes)
        dense = [{n: torch.randn(r, c, device=dev, dtype=dt) * 0.02 for n, (r, c) in shapes.items()}
                 for _ in range(n_layers)]
        base: dict = {}
        for M in tokens:
            xs = shared_inputs(M, shapes, dev, dt)
            row = {}
            for n in LINEARS:
                ws = [layer[n] for layer in dense[:copies_for(dense[0][n].numel() * 2)]]
                while len(ws) < copies_for(dense[0][n].numel() * 2):
                    ws.append(ws[len(ws) % len(dense)].clone())
                row[n] = graph_time([lambda w=w, x=xs[n]: F.linear(x, w) for w in ws]) / len(ws)
            row["layer_seq"] = graph_time([lambda layer=layer, n=n, x=xs[n]: F.linear(x, layer[n])
                                           for layer in dense for n in LINEARS]) / len(dense)
            row["layer_model"] = model_order_time(dense, xs, lambda w, x: F.linear(x, w))
            fused = [dict(layer, **{f: torch.cat([layer[n] for n in ns]) for f, ns in FUSED.items()}) for layer in dense]
            row["layer_model_fused"] = model_order_time(fused, xs, lambda w, x: F.linear(x, w), FUSED_ORDER)
            del fused
            row["stand_in"] = stand_in_time(xs["q_proj"], len(dense))
            base[M] = row
            log(f"{model} fp16 M={M}: layer {row['layer_seq'] * 1e6:.1f} us")
        del dense
        out.setdefault("fp16", {})[model] = base
        for setting in settings:
            target, sparsity = SETTINGS[setting]
            mods = {}
            for i, (n, (r, c)) in enumerate(shapes.items()):
                parts = synthetic_parts(r, c, target, sparsity, seed=i, device=dev)
                m = MixedBitLinear.from_parts(parts, bias=None, dtype=dt, device=dev)
                mods[n] = (m, parts["avg_bits"])
                del parts
            layer_bytes = sum(m.packed_bytes() for m, _ in mods.values())
            res: dict = {"avg_bits": {n: a for n, (_, a) in mods.items()},
                         "bytes": {n: m.packed_bytes() for n, (m, _) in mods.items()},
                         "fp16_bytes": {n: 2 * r * c for n, (r, c) in shapes.items()}, "tokens": {}}
            copies = {n: [m] + [copy.deepcopy(m) for _ in range(copies_for(m.packed_bytes()) - 1)]
                      for n, (m, _) in mods.items()}
            n_layers = copies_for(layer_bytes)
            for M in tokens:
                xs = shared_inputs(M, shapes, dev, dt)
                row = {}
                for n in LINEARS:
                    r, c = shapes[n]
                    key = (r, c, M, dt)
                    # tune the fused kernel once per shape and token count (first setting), where it runs
                    if key not in mixed_kernel.TUNED and not mixed_kernel.pick_config(M, r, c, dt).get("DENSE"):
                        trials = []
                        for cand in candidates(M):
                            for m in copies[n]:
                                m.tune = cand
                            trials.append((graph_time([lambda m=m, x=xs[n]: m(x) for m in copies[n]], reps=7)
                                           / len(copies[n]), cand))
                        best = min(trials, key=lambda t: t[0])[1]
                        mixed_kernel.TUNED[key] = best
                        out["tuned"][f"{r}x{c} M={M}"] = {"config": cfg_name(best), "trials_us": {
                            cfg_name(cand): round(t * 1e6, 2) for t, cand in trials}}
                    for m in copies[n]:
                        m.tune = None  # pick_config reads TUNED
                    cfg = mixed_kernel.pick_config(M, r, c, dt)  # what the forward runs
                    if cfg.get("DENSE"):
                        out["tuned"][f"{r}x{c} M={M}"] = {"config": f"dense: dequant n{cfg['BLOCK_N']} "
                                                                    f"w{cfg['num_warps']} + cuBLAS"}
                    t = graph_time([lambda m=m, x=xs[n]: m(x) for m in copies[n]]) / len(copies[n])
                    y = mods[n][0](xs[n])  # a correctness spot check against the dequantized weight
                    ref = F.linear(xs[n].float(), mods[n][0].dequantize(torch.float32))
                    err = float((y.float() - ref).norm() / ref.norm())
                    row[n] = {"us": t * 1e6, "fp16_us": base[M][n] * 1e6, "speedup": base[M][n] / t,
                              "GBps": res["bytes"][n] / t / 1e9, "rel_err": err, "path": path_name(cfg)}
                layer_copies = [{n: copies[n][i % len(copies[n])] for n in LINEARS} for i in range(n_layers)]
                tseq = graph_time([lambda layer=layer, n=n, x=xs[n]: layer[n](x)
                                   for layer in layer_copies for n in LINEARS]) / n_layers
                tmodel = model_order_time(layer_copies, xs, lambda m, x: m(x))
                tgroup = None
                if M == 1:  # q/k/v and gate/up each one launch (mixed_linear.SharedInputGroup), where it pays
                    for layer in layer_copies:
                        for ns in FUSED.values():
                            SharedInputGroup([layer[n] for n in ns])
                    tgroup = model_order_time(layer_copies, xs, lambda m, x: m(x))
                    for layer in layer_copies:
                        for n in LINEARS:
                            layer[n].group = None
                tsum = sum(row[n]["us"] for n in LINEARS)
                fsum = sum(base[M][n] for n in LINEARS) * 1e6
                paths = sorted({row[n]["path"] for n in LINEARS})
                row["layer"] = {"path": "+".join(paths),
                                "sum_us": tsum, "fp16_sum_us": fsum, "speedup_sum": fsum / tsum,
                                "seq_us": tseq * 1e6, "fp16_seq_us": base[M]["layer_seq"] * 1e6,
                                "speedup_seq": base[M]["layer_seq"] / tseq,
                                "GBps_seq": layer_bytes / tseq / 1e9,
                                "model_us": tmodel * 1e6, "fp16_model_us": base[M]["layer_model"] * 1e6,
                                "stand_in_us": base[M]["stand_in"] * 1e6,
                                "fp16_model_fused_us": base[M]["layer_model_fused"] * 1e6,
                                "model_grouped_us": None if tgroup is None else tgroup * 1e6,
                                "speedup_grouped": None if tgroup is None else
                                (base[M]["layer_model"] - base[M]["stand_in"]) / (tgroup - base[M]["stand_in"]),
                                "speedup_grouped_vs_fused": None if tgroup is None else
                                (base[M]["layer_model_fused"] - base[M]["stand_in"]) / (tgroup - base[M]["stand_in"]),
                                "speedup_model": (base[M]["layer_model"] - base[M]["stand_in"])
                                / (tmodel - base[M]["stand_in"])}
                res["tokens"][M] = row
                log(f"{model} {setting} M={M} ({row['layer']['path']}): layer {tseq * 1e6:.1f} us vs fp16 "
                    f"{base[M]['layer_seq'] * 1e6:.1f} "
                    f"({row['layer']['speedup_seq']:.2f}x; sum of linears {row['layer']['speedup_sum']:.2f}x; in model "
                    f"order {row['layer']['model_us']:.1f} vs {row['layer']['fp16_model_us']:.1f} us with "
                    f"{row['layer']['stand_in_us']:.1f} of stand-ins, linears {row['layer']['speedup_model']:.2f}x; "
                    f"grouped {row['layer']['model_grouped_us'] or 0:.1f} us, {row['layer']['speedup_grouped'] or 0:.2f}x, "
                    f"{row['layer']['speedup_grouped_vs_fused'] or 0:.2f}x of fp16 with q/k/v and gate/up concatenated "
                    f"({row['layer']['fp16_model_fused_us']:.1f} us)), "
                    f"max rel err {max(row[n]['rel_err'] for n in LINEARS):.1e}")
            out["settings"].setdefault(model, {})[setting] = res
            del mods, copies
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- model: memory and quality
def file_bytes(folder: Path) -> dict[str, int]:
    """Stored bytes per packed linear of a packed save (codes, scales, zeros, perm, mask)."""
    header, stored = packing.read_packed(folder)
    out: dict[str, int] = {}
    for k, t in stored.items():
        name, _, part = k.rpartition(".")
        if name in header["linears"] and part in packing.PACKED_PARTS:
            out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def gpu_model_bytes(load) -> tuple[object, int]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = load()
    torch.cuda.synchronize()
    return model, torch.cuda.memory_allocated() - before


def generate_both(dense, fast, tok, dev, n_new: int) -> list[dict]:
    rows = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
        with torch.no_grad():
            a = dense.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)
            b = fast.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)
        row = {"prompt": prompt, "equal": bool(torch.equal(a, b)), "text_dense": tok.decode(a[0, ids.shape[1]:]),
               "text_packed": tok.decode(b[0, ids.shape[1]:])}
        if not row["equal"]:  # the first token where they part, and how close the dense model's call was
            n = min(a.shape[1], b.shape[1])
            i = int((a[0, :n] != b[0, :n]).nonzero()[0])
            with torch.no_grad():
                la = dense(a[:, :i]).logits[0, -1].float()
                lb = fast(a[:, :i]).logits[0, -1].float()
            ta, tb = int(a[0, i]), int(b[0, i])
            row.update(first_diff=i - ids.shape[1], dense_gap=float(la[ta] - la[tb]), packed_gap=float(lb[tb] - lb[ta]))
        rows.append(row)
    return rows


def bench_model(args, dev, log) -> dict:
    folder = Path(args.packed)
    dt = torch.float16
    out: dict = {"packed": str(folder)}
    report = folder / "compression_report.json"
    if report.exists():
        rep = json.loads(report.read_text())
        out["compression"] = {k: rep.get(k) for k in ("avg_bits", "effective_bits", "sparsity", "bits_histogram")}
        out["compression"]["disk"] = rep.get("disk", {}).get("quantized_linears")
    # (2) memory
    fast, fast_bytes = gpu_model_bytes(lambda: packing.load_packed(folder, dtype=dt, device=dev, keep_packed=True))
    mixed = {n: m for n, m in fast.named_modules() if isinstance(m, MixedBitLinear)}
    if args.one_token != "auto":  # every linear's one-token product through the kernel asked for
        force = mixed_kernel.GEMV1_GLUON if args.one_token == "gluon" else mixed_kernel.GEMV1
        for m in mixed.values():
            mixed_kernel.TUNED[(m.out_features, m.in_features, 1, dt)] = dict(force)
        for g in {id(m.group): m.group for m in mixed.values() if m.group is not None}.values():  # q/k/v, gate/up
            mixed_kernel.TUNED[(g.out_features, g.members[0].in_features, 1, dt)] = dict(force)
        out["one_token"] = args.one_token
    out["groups"] = len({id(m.group) for m in mixed.values() if m.group is not None})
    stored = file_bytes(folder)
    lin_gpu = sum(m.packed_bytes() for m in mixed.values())
    lin_file = sum(stored[n] for n in mixed)
    lin_fp16 = sum(2 * m.in_features * m.out_features for m in mixed.values())
    n_w = lin_fp16 // 2
    dense, dense_bytes = gpu_model_bytes(lambda: packing.load_packed(folder, dtype=dt, device=dev))
    out["memory"] = {"model_gpu_bytes_packed": fast_bytes, "model_gpu_bytes_fp16": dense_bytes,
                     "model_ratio": fast_bytes / dense_bytes, "linears": len(mixed),
                     "linears_gpu_bytes": lin_gpu, "linears_file_bytes": lin_file, "linears_fp16_bytes": lin_fp16,
                     "linears_gpu_vs_file": lin_gpu / lin_file, "linears_gpu_vs_fp16": lin_gpu / lin_fp16,
                     "linears_gpu_bits_per_weight": 8 * lin_gpu / n_w, "linears_file_bits_per_weight": 8 * lin_file / n_w,
                     "codes_bits_per_weight": 8 * sum(m.qweight.numel() * 4 for m in mixed.values()) / n_w,
                     "workspace_bytes": sum(w.numel() * w.element_size() + c.numel() * c.element_size()
                                            for w, c in mixed_kernel._WORKSPACE.values())}
    log(f"memory: packed model {fast_bytes / 2**20:.1f} MiB vs fp16 {dense_bytes / 2**20:.1f} MiB; linears "
        f"{lin_gpu / 2**20:.2f} MiB on GPU vs {lin_file / 2**20:.2f} MiB stored vs {lin_fp16 / 2**20:.2f} MiB fp16")
    # (3) generation on the GPU, whole models resident
    tok = load_tokenizer(str(folder), False)
    out["generation"] = generate_both(dense, fast, tok, dev, args.new_tokens)
    for g in out["generation"]:
        log(f"generation equal={g['equal']}: {g['prompt'][:30]!r} -> {g['text_packed'][:60]!r}")
    # decode speed of the whole model (Python overhead included; 135M is too small to be bandwidth-bound)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids.to(dev)
    for name, m in (("fp16", dense), ("packed", fast)):
        with torch.no_grad():
            m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            torch.cuda.synchronize()
        out.setdefault("generate_tokens_per_s", {})[name] = args.new_tokens / (time.perf_counter() - t0)
    # in use: with the work lists that prefill (dense path) and decoding (GEMV) built on the way
    in_use = sum(m.packed_bytes() for m in mixed.values())
    out["memory"].update(linears_gpu_bytes_in_use=in_use, linears_gpu_in_use_vs_file=in_use / lin_file)
    del dense, fast, mixed
    torch.cuda.empty_cache()
    # (3) perplexity: the project's layer-streaming evaluation, same windows for both
    tokens = get_eval_tokens(args.eval, tok, args.seqlen)
    ppl = {}
    for name, keep in (("dense", False), ("packed", True)):
        model = packing.load_packed(folder, dtype=dt, device="cpu", keep_packed=keep)
        t0 = time.perf_counter()
        ppl[name] = perplexity(model, ARCHS[model.config.model_type], tokens, args.seqlen, dev, dt, args.windows)
        ppl[name + "_s"] = time.perf_counter() - t0
        del model
    ppl["rel_diff"] = ppl["packed"] / ppl["dense"] - 1
    out["perplexity"] = dict(ppl, windows=args.windows, seqlen=args.seqlen, eval=str(args.eval))
    log(f"perplexity dense {ppl['dense']:.4f} packed {ppl['packed']:.4f} ({100 * ppl['rel_diff']:+.4f}%)")
    return out


# ---------------------------------------------------------------- report
def commit() -> str | None:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _int_keys(r: dict) -> dict:
    """JSON turns the token counts into strings (a merged run): back to ints."""
    return {int(k): v for k, v in r.items()}


def markdown(res: dict) -> str:
    L = [f"# Packed inference: {res['machine']['gpu']}, {res['date']}", "",
         f"`{res['command']}`  ", f"commit {res['commit']}; torch {res['machine']['torch']}, triton "
         f"{res['machine']['triton']}, transformers {res['machine']['transformers']}", ""]
    k = res.get("kernels")
    if k:
        for settings in k["settings"].values():
            for r in settings.values():
                r["tokens"] = _int_keys(r["tokens"])
        toks = sorted(next(iter(next(iter(k["settings"].values())).values()))["tokens"])

        def path(r: dict, m: int) -> str:  # runs before the dense path have no "path": fused
            return r["tokens"][m]["layer"].get("path", "fused")
        paths = {m: sorted({path(r, m) for st in k["settings"].values() for r in st.values()}) for m in toks}
        L += ["## Per layer (the 7 linears back to back, CUDA graph): speed-up over fp16 cuBLAS (packed vs fp16 us)",
              "", "What ran, per token count (gemv: gemv_kernel; fused: the fused kernel; dense: dequant_kernel into a "
              "buffer, then cuBLAS): " + ", ".join(f"{m} tok {'/'.join(p)}" for m, p in paths.items()), "",
              "| model | stored bits | " + " | ".join(f"{m} tok" for m in toks) + f" | packed GB/s, {toks[0]} tok |",
              "|---|---|" + "---|" * (len(toks) + 1)]
        for model, settings in k["settings"].items():
            for setting, r in settings.items():
                bits = sum(r["avg_bits"][n] * r["fp16_bytes"][n] for n in LINEARS) / sum(r["fp16_bytes"].values())
                gpu_bits = 16 * sum(r["bytes"].values()) / sum(r["fp16_bytes"].values())
                cells = [f"{r['tokens'][m]['layer']['speedup_seq']:.2f}x ({r['tokens'][m]['layer']['seq_us']:.0f} vs "
                         f"{r['tokens'][m]['layer']['fp16_seq_us']:.0f}, {path(r, m)})" for m in toks]
                L.append(f"| {model} | {setting} ({bits:.2f} weight bits, {gpu_bits:.2f} on GPU) | " + " | ".join(cells)
                         + f" | {r['tokens'][toks[0]]['layer']['GBps_seq']:.0f} |")
        if "model_us" in next(iter(next(iter(k["settings"].values())).values()))["tokens"][toks[0]]["layer"]:
            L += ["", "In model order (q, k, v, stand-in, o, stand-in, gate, stand-in, up, stand-in, down, stand-in; a "
                      "stand-in is one small kernel where the model runs others): the linears' speed-up over fp16, "
                      "(fp16 layer - stand-ins) / (packed layer - stand-ins), and the layer in us, packed vs fp16. "
                      "Grouped: q/k/v and gate/up each one launch (mixed_linear.SharedInputGroup, one token), against "
                      "fp16 as the model runs it and against fp16 with q/k/v and gate/up each one product of "
                      "concatenated weights (fused fp16, as serving runtimes hold them)",
                  "", "| model | setting | " + " | ".join(f"{m} tok" for m in toks) + " |", "|---|---|" + "---|" * len(toks)]
            for model, settings in k["settings"].items():
                for setting, r in settings.items():
                    cells = []
                    for m in toks:
                        la = r["tokens"][m]["layer"]
                        cell = (f"{la['speedup_model']:.2f}x ({la['model_us']:.0f} vs {la['fp16_model_us']:.0f}, "
                                f"stand-ins {la['stand_in_us']:.0f})")
                        if la.get("model_grouped_us"):
                            cell += (f"; grouped **{la['speedup_grouped']:.2f}x** ({la['model_grouped_us']:.0f}), "
                                     f"{la['speedup_grouped_vs_fused']:.2f}x of fused fp16 ({la['fp16_model_fused_us']:.0f})")
                        cells.append(cell)
                    L.append(f"| {model} | {setting} | " + " | ".join(cells) + " |")
        L += ["", "Sum of the 7 per-linear medians, fp16 / packed:", "",
              "| model | setting | " + " | ".join(f"{m} tok" for m in toks) + " |", "|---|---|" + "---|" * len(toks)]
        for model, settings in k["settings"].items():
            for setting, r in settings.items():
                L.append(f"| {model} | {setting} | " + " | ".join(
                    f"{r['tokens'][m]['layer']['speedup_sum']:.2f}x" for m in toks) + " |")
        for model, settings in k["settings"].items():
            setting = "3.5" if "3.5" in settings else next(iter(settings))
            r = settings[setting]
            L += ["", f"### {model}, {setting} bits: per linear, us (packed / fp16, speed-up, packed GB/s, path)", "",
                  "| linear | shape | " + " | ".join(f"{m} tok" for m in toks) + " |", "|---|---|" + "---|" * len(toks)]
            for n in LINEARS:
                shp = "x".join(map(str, SHAPES[model][n]))
                L.append(f"| {n} | {shp} | " + " | ".join(
                    f"{r['tokens'][m][n]['us']:.1f} / {r['tokens'][m][n]['fp16_us']:.1f}, "
                    f"{r['tokens'][m][n]['speedup']:.2f}x, {r['tokens'][m][n]['GBps']:.0f}, "
                    f"{r['tokens'][m][n].get('path', 'fused')}" for m in toks) + " |")
        L += ["", "Configuration per shape and token count (gemv, fused: the best of the candidates timed; dense: "
                  "pick_config's):", ""]
        L += [f"- {key}: {v['config']}" for key, v in k["tuned"].items()]
    m = res.get("model")
    if m:
        mem = m["memory"]
        L += ["", "## Packed SmolLM2 on the GPU", "",
              f"- whole model: {mem['model_gpu_bytes_packed'] / 2**20:.1f} MiB packed vs "
              f"{mem['model_gpu_bytes_fp16'] / 2**20:.1f} MiB fp16 ({mem['model_ratio']:.3f}x)",
              f"- the {mem['linears']} compressed linears: {mem['linears_gpu_bytes'] / 2**20:.2f} MiB on the GPU, "
              f"{mem['linears_file_bytes'] / 2**20:.2f} MiB stored in the file, {mem['linears_fp16_bytes'] / 2**20:.2f} "
              f"MiB in fp16: {mem['linears_gpu_vs_file']:.3f}x the stored bytes, {mem['linears_gpu_vs_fp16']:.3f}x fp16 "
              f"({mem['linears_gpu_bits_per_weight']:.2f} bits per weight on the GPU, "
              f"{mem['linears_file_bits_per_weight']:.2f} stored; codes alone {mem['codes_bits_per_weight']:.2f})",
              f"- shared kernel workspace: {mem['workspace_bytes'] / 2**10:.0f} KiB", ""]
        if "linears_gpu_bytes_in_use" in mem:
            L[-1:-1] = [f"- after generating (the work lists of prefill and decoding built): "
                        f"{mem['linears_gpu_bytes_in_use'] / 2**20:.2f} MiB, {mem['linears_gpu_in_use_vs_file']:.3f}x "
                        "the stored bytes"]
        p = m["perplexity"]
        L += [f"Perplexity ({p['windows']} windows of {p['seqlen']} tokens of `{Path(p['eval']).name}`): dense decode "
              f"{p['dense']:.4f}, packed runtime {p['packed']:.4f} ({100 * p['rel_diff']:+.4f}%)", "",
              "| prompt | greedy 64 tokens equal | first difference |", "|---|---|---|"]
        for g in m["generation"]:
            diff = "" if g["equal"] else (f"token {g['first_diff']}: dense logit gap {g['dense_gap']:.3f}, "
                                          f"packed {g['packed_gap']:.3f}")
            L.append(f"| {g['prompt'][:40]!r} | {g['equal']} | {diff} |")
        t = m.get("generate_tokens_per_s", {})
        if t:
            L += ["", f"`generate` speed (Python overhead included): fp16 {t['fp16']:.1f} tok/s, packed "
                      f"{t['packed']:.1f} tok/s"]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["warm", "kernels"], choices=["warm", "kernels", "model"],
                    help="warm: compile the kernel configurations in parallel first (Triton's disk cache)")
    ap.add_argument("--packed", help="folder of a --save_format packed save (for --parts model)")
    ap.add_argument("--eval", help="evaluation text for perplexity (for --parts model)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--one_token", default="auto", choices=["auto", "gluon", "gemv"],
                    help="(3): the one-token kernel of every linear: pick_config's choice (auto), mixed_gemv's "
                         "(gluon) or gemv_kernel's (gemv)")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="(1): layer shapes")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="(1): stored bits")
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), help="(1): token counts")
    ap.add_argument("--merge", help="a JSON of an earlier run whose parts are kept")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--compile_processes", type=int, default=12)
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(msg, flush=True)

    res = json.loads(Path(args.merge).read_text()) if args.merge else {}
    import transformers
    import triton
    command = "python -m bench.inference " + " ".join(sys.argv[1:])
    if res.get("command"):
        command = res["command"] + " ; " + command
    res.update(date=datetime.date.today().isoformat(), command=command,
               commit=commit(), machine={"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                                         "triton": triton.__version__, "transformers": transformers.__version__,
                                         "python": platform.python_version()})
    if "warm" in args.parts:  # compile every configuration used below and by tests_gpu, in parallel
        t0 = time.perf_counter()
        fused = [M for M in args.tokens if not mixed_kernel.pick_config(M, 1024, 1024, torch.float16).get("DENSE")]
        configs = [(c, torch.float16) for M in fused for c in candidates(M)]
        # gemv_kernel compiles per width range (MixedBitLinear.wmask): the synthetic linears' ranges
        masks = {width_mask(WIDTHS[SETTINGS[s][0]]) for s in args.settings}
        configs += [(dict(c, WMASK=m), d) for c, d in configs if c.get("GEMV") for m in masks]
        configs += [(mixed_kernel.pick_config(M, 1024, 1024, d), d) for M in set(args.tokens) | set(TOKENS) | {32}
                    for d in (torch.float16, torch.bfloat16, torch.float32)]
        mixed_kernel.warm_up(configs, processes=args.compile_processes)
        log(f"compiled the kernel configurations in {time.perf_counter() - t0:.1f} s")
        if args.parts == ["warm"]:
            return
    if "kernels" in args.parts:
        res["kernels"] = bench_kernels(dev, log, args.models, args.settings, sorted(args.tokens))
    if "model" in args.parts:
        res["model"] = bench_model(args, dev, log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"inference-{res['machine']['gpu'].replace(' ', '-')}-{res['date']}{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
