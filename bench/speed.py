"""Speed and peak GPU memory of the real pipeline on decoder layers of LLaMA-2 shapes.

    python -m bench.speed [--shapes 7b 13b 70b] [--methods ...] [--nsamples 128] [--repeats 3]
    python -m bench.speed --model7b TOKENIZER.gguf EVAL.txt      # + a whole random 32-layer 7B model
    python -m bench.speed --gpus 1 2 ...                         # each row on 1, then 2 GPUs

One decoder layer with random weights gets `nsamples` x 2048 random calibration activations
on the GPU; `compress.compress_layer` (the code the CLI runs) compresses it with a stage
timer (devices synchronized at stage boundaries), then the outputs are computed as the next
layer would need them. With several GPUs the layer is replicated and the samples split as
compress_model does (the replication is timed). A warm-up on 8 samples comes first; medians
of the repeats are kept.
Writes speed-<device>-<date>.json and .md in bench/results (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from compress import StageTimer, compress_layer, compress_model
from config import CompressConfig
from events import versions
from layerwise import Team, perplexity
from model_io import ARCHS, load_tokenizer
from parallel import replicate, scatter, to_device

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}
METHODS = {
    "sparsegpt_50": dict(use_mi_grouping=False, sparsity=0.5),
    "gptq_w4_g128": dict(use_mi_grouping=False, wbits=4, groupsize=128),
    "mi_50_t4.0_k10": dict(sparsity=0.5, wbits=4, target_avg_bits=4.0, n_groups=10),
    # --true_sequential 0: one forward pass per layer, the sets solved at the same time (one per GPU)
    "sparsegpt_50_one_pass": dict(use_mi_grouping=False, sparsity=0.5, true_sequential=False),
    "mi_50_t4.0_k10_one_pass": dict(sparsity=0.5, wbits=4, target_avg_bits=4.0, n_groups=10, true_sequential=False),
}
DEFAULT_METHODS = ["sparsegpt_50", "gptq_w4_g128", "mi_50_t4.0_k10"]


def llama_config(shape: str, layers: int = 1, vocab: int = 32000):
    from transformers import LlamaConfig
    cfg = LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
                      **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    return cfg


def layer_inputs(cfg, nsamples: int, seqlen: int, dev):
    """Random hidden states and the keyword arguments a LLaMA model passes its layers."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    gen = torch.Generator(device=dev).manual_seed(0)
    inps = torch.randn(nsamples, seqlen, cfg.hidden_size, device=dev, dtype=torch.float16, generator=gen)
    pos = torch.arange(seqlen, device=dev)[None]
    rot = LlamaRotaryEmbedding(cfg).to(dev)
    kwargs = {"attention_mask": None, "position_ids": pos, "position_embeddings": rot(inps[:1], pos),
              "use_cache": False}
    return inps, kwargs


def random_layer(shape: str, dev):
    """(config, a LLaMA decoder layer of `shape` with random weights in fp16 on dev, a CPU copy of
    its state to restore between repeats)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    cfg = llama_config(shape)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(dev, torch.float16)
    for p in layer.parameters():
        p.data.normal_(0, 0.02) if p.dim() == 2 else p.data.fill_(1)
    original = {k: v.to("cpu", copy=True) for k, v in layer.state_dict().items()}  # not on the GPU: not in the peak
    return cfg, layer, original


def time_layer(shape: str, method: str, nsamples: int, seqlen: int, repeats: int, devs: list,
               cap_gib: float | None = None, timer_cls=StageTimer) -> dict:
    """One layer compressed `repeats` times (after a warm-up on 8 samples); medians. cap_gib: as
    --max_gpu_memory, enforced with torch's per-process memory fraction; the activations stay
    in pinned host memory where layerwise.offload_activations says they would not fit."""
    from layerwise import offload_activations
    from parallel import split_counts
    dev = devs[0]
    cfg, layer, original = random_layer(shape, dev)
    inps, kwargs = layer_inputs(cfg, nsamples, seqlen, dev)
    offload = offload_activations(cfg, nsamples, seqlen, torch.float16, devs, cap_gib)
    if offload:
        inps = inps.to("cpu").pin_memory() if dev.type == "cuda" else inps.to("cpu")
    ccfg = CompressConfig(**METHODS[method])
    spec = ARCHS["llama"]
    runs = []
    kw = [kwargs] + [to_device(kwargs, d) for d in devs[1:]]
    cuda = [d for d in devs if d.type == "cuda"]
    if cap_gib:
        for d in cuda:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2 ** 30 / torch.cuda.get_device_properties(d).total_memory, d)
    try:
        for rep in range(repeats + 1):  # the first is the warm-up, on 8 samples
            layer.load_state_dict(original)
            x = inps[:8] if rep == 0 else inps
            shares = list(x.split(split_counts(x.shape[0], len(devs)))) if offload else scatter(x, devs)
            for d in cuda:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
            timer = timer_cls(devs, enabled=True)
            tick = time.perf_counter()
            team = Team(devs, shares, kw, 4)
            with timer("replicate"):
                team.layers = replicate(layer, devs)
            compress_layer(team, 0, spec, ccfg, timer=timer)
            with timer("forward outputs"):  # in place, as compress_model does
                team.forward(in_place=True)
            for d in cuda:
                torch.cuda.synchronize(d)
            total = time.perf_counter() - tick
            del team, shares
            if rep:
                peak = timer.peak_gib() if hasattr(timer, "peak_gib") else max(
                    (torch.cuda.max_memory_allocated(d) for d in cuda), default=0) / 2 ** 30
                runs.append({**timer.seconds, "total": total, "peak_gib": peak,
                             **({"stage_peak_gib": timer.peaks} if hasattr(timer, "peaks") else {})})
    finally:
        for d in cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, d)
    del inps, layer
    if cuda:
        torch.cuda.empty_cache()
    keys = sorted({k for r in runs for k in r})
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    grouping = sum(med.get(k, 0.0) for k in ("mi", "clustering", "allocation", "trial solves"))
    return {"shape": shape, "method": method, "gpus": len(devs), "nsamples": nsamples, "seqlen": seqlen,
            "repeats": repeats, "cap_gib": cap_gib, "offloaded": offload,
            "median": med, "grouping_share": grouping / med["total"], "runs": runs}


def whole_model(tok_src: str, eval_txt: str, nsamples: int, seqlen: int, devs: list,
                method: str = "mi_50_t4.0_k10") -> dict:
    """A random 32-layer LLaMA-2-7B-shaped model: compression (`method`, by default 50% + MI 4.0)
    and evaluation."""
    dev = devs[0]
    from transformers import LlamaForCausalLM
    from datautils import get_eval_tokens
    tok = load_tokenizer(tok_src, False)
    cfg = llama_config("7b", layers=32, vocab=len(tok))
    tick = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):  # random init is fast on the GPU; the pipeline then keeps it on the CPU
        model = LlamaForCausalLM(cfg).half()
    model = model.cpu()
    torch.cuda.empty_cache()
    model.config.use_cache = False
    model.eval()
    torch.set_grad_enabled(False)
    build = time.perf_counter() - tick
    print(f"7b model built in {build:.1f}s", flush=True)
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, len(tok), (1, seqlen), generator=gen) for _ in range(nsamples)]
    ccfg = CompressConfig(**METHODS[method])
    for d in devs:
        torch.cuda.reset_peak_memory_stats(d)
    tick = time.perf_counter()
    compress_model(model, ARCHS["llama"], ccfg, windows, devs, torch.float16,
                   lambda e: print(f"layer {e['layer']} done in {e['seconds']:.1f}s", flush=True)
                   if e["event"] == "layer" else None)
    compress = time.perf_counter() - tick
    tick = time.perf_counter()
    tokens = get_eval_tokens(eval_txt, tok, seqlen)
    ppl = perplexity(model, ARCHS["llama"], tokens, seqlen, devs, torch.float16)
    evaluate = time.perf_counter() - tick
    del model
    return {"gpus": len(devs), "method": method, "build_s": build, "compress_s": compress, "eval_s": evaluate,
            "total_s": compress + evaluate, "eval_windows": tokens.shape[1] // seqlen, "ppl_random_model": ppl,
            "peak_gib": max(torch.cuda.max_memory_allocated(d) for d in devs) / 2 ** 30}


def run_meta(machine: str, out: str) -> tuple[dict, Path]:
    """What every result file says about its run (machine, date, commit, command, versions), and
    the results folder, created."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return {"machine": machine, "date": datetime.date.today().isoformat(), "commit": versions().get("commit"),
            "command": " ".join(sys.argv), "versions": versions()}, folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--model_method", default="mi_50_t4.0_k10", choices=list(METHODS),
                   help="method of the whole-model row (--model7b)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model7b", nargs=2, metavar=("TOKENIZER", "EVAL_TXT"),
                   help="also run a whole random 32-layer 7B-shaped model with this tokenizer/eval text")
    p.add_argument("--gpus", nargs="*", type=int, default=[1],
                   help="run every row on this many GPUs (cuda:0..N-1), e.g. --gpus 1 2")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    dev = torch.device("cuda:0")
    if max(args.gpus) > torch.cuda.device_count():
        p.error(f"--gpus {max(args.gpus)}: only {torch.cuda.device_count()} GPU(s) visible")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name(dev)
    rows = []
    for shape in args.shapes:
        for method in args.methods:
            for n in args.gpus:
                devs = [torch.device(f"cuda:{i}") for i in range(n)]
                r = time_layer(shape, method, args.nsamples, args.seqlen, args.repeats, devs)
                base = next((b for b in rows if (b["shape"], b["method"], b["gpus"]) == (shape, method, 1)), None)
                r["speedup_vs_1gpu"] = base["median"]["total"] / r["median"]["total"] if base else None
                rows.append(r)
                m = r["median"]
                print(f"{shape:4s} {method:16s} gpus {n}  total {m['total']:6.2f}s  " +
                      "  ".join(f"{k} {v:.2f}" for k, v in m.items() if k not in ("total", "peak_gib")) +
                      f"  grouping {100 * r['grouping_share']:.1f}%  peak {m['peak_gib']:.2f} GiB" +
                      (f"  speed-up {r['speedup_vs_1gpu']:.2f}x" if r["speedup_vs_1gpu"] else ""), flush=True)
    model_rows = []
    if args.model7b:
        for n in args.gpus:
            row = whole_model(args.model7b[0], args.model7b[1], args.nsamples, args.seqlen,
                              [torch.device(f"cuda:{i}") for i in range(n)], args.model_method)
            model_rows.append(row)
            print("7b model: " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()), flush=True)
    meta, out = run_meta(name, args.out)
    date = meta["date"]
    stem = f"speed-{name.replace(' ', '-')}-{date}{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "gpu_count": torch.cuda.device_count(), "layers": rows,
                                                  "model_7b": model_rows}, indent=1))
    lines = [f"Machine {name} x{torch.cuda.device_count()}, {date}, commit {meta['commit']}",
             f"`{meta['command']}`", "",
             "| shape | method | GPUs | replicate | forward+hessian | mi | clustering | allocation | solve | "
             "forward outputs | total | speed-up | grouping share | peak GiB per GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median"]
        lines.append(f"| {r['shape']} | {r['method']} | {r['gpus']} | " + " | ".join(
            f"{m.get(k, 0.0):.2f}" for k in ("replicate", "forward+hessian", "mi", "clustering", "allocation",
                                             "solve", "forward outputs", "total")) +
            f" | {r['speedup_vs_1gpu'] or 1.0:.2f}x | {100 * r['grouping_share']:.1f}% | {m['peak_gib']:.2f} |")
    for row in model_rows:
        lines += ["", f"Whole random 7B-shaped model (32 layers, 50% + MI 4.0, 10 groups) on {row['gpus']} GPU(s): " +
                  ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md")


if __name__ == "__main__":
    main()
