"""Quality matrix: perplexity against bits for the baselines, the MI method and its ablations,
all on one loaded model (weights restored between rows), through the real pipeline code.

    python -m bench.quality MODEL CALIB.txt EVAL.txt [--rows NAME ...] [--out bench/results]
    python -m bench.quality ... --device cuda:0,cuda:1       # the same rows spread over two GPUs

Protocol of the anchors: calibration = 128 windows of 2048 tokens from CALIB tokenized as one
string (offsets from torch.Generator().manual_seed(0)); evaluation = the first 128
non-overlapping 2048-token windows of EVAL. Writes quality-<device>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from compress import compress_model
from config import CompressConfig
from events import summarize, versions
from layerwise import perplexity
from model_io import ARCHS, load_model, load_tokenizer
from datautils import get_eval_tokens, get_loaders
from parallel import device_list

U = dict(use_mi_grouping=False)


def _rows() -> dict[str, dict]:
    rows = {"fp16": dict(U)}
    for b in (3, 4):
        rows[f"rtn_w{b}"] = dict(U, rtn=True, wbits=b)
        rows[f"rtn_w{b}_g128"] = dict(U, rtn=True, wbits=b, groupsize=128)
    for b in (2, 3, 4):
        rows[f"gptq_w{b}"] = dict(U, wbits=b)
        rows[f"gptq_w{b}_g128"] = dict(U, wbits=b, groupsize=128)
    rows["gptq_w3_g128_actorder"] = dict(U, wbits=3, groupsize=128, act_order=True)
    rows["sparsegpt_50"] = dict(U, sparsity=0.5)
    rows["sparsegpt_50_blockmask"] = dict(U, sparsity=0.5, mask_scope="block")  # the reference's mask rule
    rows["sparsegpt_2:4"] = dict(U, prunen=2, prunem=4)
    rows["sparsegpt_50_w4"] = dict(U, sparsity=0.5, wbits=4)
    for t in (2.5, 3.0, 3.5, 4.0):
        for k in (4, 10, 16):
            rows[f"mi_t{t}_k{k}"] = dict(wbits=4, target_avg_bits=t, n_groups=k, grouping="mi")
    for t in (3.0, 4.0):
        rows[f"sparse50_mi_t{t}_k10"] = dict(sparsity=0.5, wbits=4, target_avg_bits=t, n_groups=10, grouping="mi")
        rows[f"sparse50_mi_hessian_t{t}_k10"] = dict(sparsity=0.5, wbits=4, target_avg_bits=t, n_groups=10,
                                                     grouping="mi_hessian")
    for g in ("random", "contiguous", "hessian"):
        rows[f"ablation_{g}_t3.0_k10"] = dict(wbits=4, target_avg_bits=3.0, n_groups=10, grouping=g)
    rows["ablation_binned_t3.0_k10"] = dict(wbits=4, target_avg_bits=3.0, n_groups=10, mi_method="binned",
                                            grouping="mi")
    for t, k in ((3.0, 4), (3.0, 10), (3.5, 4), (4.0, 4)):
        rows[f"mi_hessian_t{t}_k{k}"] = dict(wbits=4, target_avg_bits=t, n_groups=k, grouping="mi_hessian")
    rows["ablation_hessian_t3.0_k4"] = dict(wbits=4, target_avg_bits=3.0, n_groups=4, grouping="hessian")
    rows["gptq_w3_g128_torchloop"] = dict(U, wbits=3, groupsize=128, no_kernel=True)
    rows["mi_t3.0_k10_torchloop"] = dict(wbits=4, target_avg_bits=3.0, n_groups=10, no_kernel=True, grouping="mi")
    return rows


ROWS = _rows()


def write_results(args, device_name: str, results: list[dict]) -> Path:
    """Results so far as JSON and a markdown table (rewritten after every row)."""
    commit = versions().get("commit")
    date = datetime.date.today().isoformat()
    slug = device_name.replace(" ", "-").replace("/", "-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{slug}-{date}{args.tag}"
    meta = {"machine": device_name, "date": date, "commit": commit, "command": " ".join(sys.argv),
            "versions": versions(), "devices": args.device, "protocol": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                      "eval_windows": args.eval_windows}}
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": results}, indent=1))
    lines = [f"Machine {device_name}, {date}, commit {commit}, devices {args.device}", f"`{meta['command']}`", "",
             "| row | seed | wiki ppl | weight bits | effective bits | sparsity | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['seed']} | {r['wiki_ppl']:.2f} | {r['avg_bits']:.3f} | {r['effective_bits']:.3f} | "
              f"{r['sparsity']:.3f} | {r['seconds']:.1f} |" for r in results]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out / stem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("calib")
    p.add_argument("eval")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help="row names (default: all): " + " ".join(ROWS))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval_windows", type=int, default=128)
    p.add_argument("--device", default="cuda:0", help="device, or several comma-separated (cuda:0,cuda:1)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (one row per seed)")
    args = p.parse_args()
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}")

    devs = device_list(args.device)
    dev = devs[0]
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    tok = load_tokenizer(args.model, False)
    model = load_model(args.model, dtype, False)
    spec = ARCHS[model.config.model_type]
    tokens = get_eval_tokens(args.eval, tok, args.seqlen)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    results = []
    for seed, name in [(sd, n) for sd in args.seeds for n in args.rows]:
        if not results or results[-1]["seed"] != seed:
            windows = get_loaders(args.calib, tok, args.nsamples, seed, args.seqlen)
        model.load_state_dict(original)
        cfg = CompressConfig(**ROWS[name])
        torch.manual_seed(0)
        tick = time.perf_counter()
        if name == "fp16":
            summary = {"avg_bits": 16.0, "effective_bits": 16.0, "sparsity": 0.0, "bits_histogram": {"16": 1.0}}
        else:
            reports = compress_model(model, spec, cfg, windows, devs, dtype).reports
            summary = summarize(reports)
        secs = time.perf_counter() - tick
        ppl = perplexity(model, spec, tokens, args.seqlen, devs, dtype, args.eval_windows)
        row = {"row": name, "seed": seed, "config": ROWS[name], "wiki_ppl": ppl, "seconds": secs, **summary}
        results.append(row)
        print(f"{name:28s} seed {seed} ppl {ppl:9.3f}  bits {summary['avg_bits']:.3f}  eff {summary['effective_bits']:.3f}  "
              f"sparsity {summary['sparsity']:.3f}  {secs:6.1f}s", flush=True)
        write_results(args, device_name, results)

    stem = write_results(args, device_name, results)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
