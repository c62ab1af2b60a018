"""How --n_groups auto's choice of plan does, one linear set at a time: each chosen layer's
linear sets are compressed from the uncompressed model's activations by uniform act-order GPTQ
w3 g128 and by the MI method at a stored budget, once choosing its plan by the allocation's
proxy alone and once by trial solves (whole clusters and clusters cut into runs), all through
the project's own planning and solver code. For every linear: stored bits, the solver's
calibration loss and the error on held-out text, ||X (W - Q)^T||^2 / ||X W^T||^2.

    python -m bench.layer_choice MODEL CALIB.txt HELDOUT.txt [--layers 1 10 20] [--device cpu]

A few minutes on a CPU for SmolLM2-135M; no perplexity (bench/quality.py does that). Writes
layer-choice-<machine>-<date><tag>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.quality import cpu_name, run_meta
from compress import choose_groups_and_bits, solve_set, stored_bits
from config import CompressConfig
from datautils import get_eval_tokens, get_loaders
from model_io import ARCHS, get_module, load_model, load_tokenizer
from sparsegpt_mi import LinearSolver

MI = CompressConfig(wbits=4, bits_budget="stored", n_groups=0, clip="mse")
METHODS = {
    "gptq_w3_g128_ao_mse": CompressConfig(use_mi_grouping=False, wbits=3, groupsize=128, act_order=True, clip="mse"),
    "mi_hessian_proxy": replace(MI, auto_select="proxy", auto_groupsize=0),
    "mi_hessian_trials": replace(MI, auto_select="solve", auto_groupsize=128),
}


def set_statistics(model, spec, layers: list[int], batches: dict[str, torch.Tensor], dev) -> dict:
    """(layer, set) -> {"cal": (H = 2/n sum x x^T, sum x, n), "held": sum x x^T / n} over the
    uncompressed model's activations at each set's input."""
    sums, phase = {}, ["cal"]

    def hook(key):
        def f(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s = sums.setdefault(key + (phase[0],), [0, 0, 0])
            s[0], s[1], s[2] = s[0] + x.T @ x, s[1] + x.sum(0), s[2] + x.shape[0]
        return f
    handles = [get_module(model.model.layers[li], names[0]).register_forward_pre_hook(hook((li, si)))
               for li in layers for si, names in enumerate(spec.groups)]
    with torch.no_grad():
        for name, ids in batches.items():
            phase[0] = name
            for i in range(0, ids.shape[0], 4):
                model(ids[i:i + 4].to(dev))
    for h in handles:
        h.remove()
    out = {}
    for li in layers:
        for si in range(len(spec.groups)):
            c, h = sums[(li, si, "cal")], sums[(li, si, "held")]
            out[(li, si)] = {"cal": ((2 * c[0] / c[2]).float(), c[1].float(), c[2]), "held": h[0] / h[2]}
    return out


def run_set(cfg: CompressConfig, stats: dict, weights: list, dev) -> tuple[list, object, float]:
    """Plan and solve one set from its statistics; (results, plan, seconds)."""
    H, xsum, n = stats["cal"]
    solver = LinearSolver(H.shape[0], dev)
    solver.H, solver.xsum, solver.nsamples, solver._scaled = H.to(dev, copy=True), xsum.to(dev), n, True
    tick = time.perf_counter()
    plan = choose_groups_and_bits(cfg, solver, weights, None, dev)
    results = solve_set(cfg, solver, [W.clone() for W in weights], plan, [dev])
    return results, plan, time.perf_counter() - tick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("calib")
    p.add_argument("heldout")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 10, 20])
    p.add_argument("--target", type=float, default=3.16, help="the MI rows' stored budget")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--heldout_windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model, False)
    model = load_model(args.model, torch.float32, False).to(dev)
    spec = ARCHS[model.config.model_type]
    cal = torch.cat(get_loaders(args.calib, tok, args.nsamples, args.seed, args.seqlen), 0)
    held = get_eval_tokens(args.heldout, tok, args.seqlen)[:, :args.heldout_windows * args.seqlen]
    stats = set_statistics(model, spec, args.layers, {"cal": cal, "held": held.reshape(-1, args.seqlen)}, dev)
    rows = []
    for (li, si), st in stats.items():
        names = spec.groups[si]
        weights = [get_module(model.model.layers[li], n).weight.data.float() for n in names]
        Ht = st["held"].to(dev)
        for method, cfg in METHODS.items():
            cfg = replace(cfg, target_avg_bits=args.target, seed=args.seed)
            results, plan, seconds = run_set(cfg, st, weights, dev)
            for name, W, r in zip(names, weights, results):
                dW = (r.weight.to(dev) - W).double()
                held_err = float(((dW @ Ht) * dW).sum() / ((W.double() @ Ht) * W.double()).sum())
                qp = {"perm": r.perm, "runs": r.runs, "scale": r.scale, "zero": r.zero}
                rows.append({"layer": li, "linear": name.split(".")[-1], "method": method,
                             "stored_bits": stored_bits(r.weight, qp, cfg), "calib_loss": r.loss,
                             "heldout_rel_err": held_err, "clusters": len(plan.groups),
                             "groupsize": plan.groupsize if cfg.mixed else cfg.groupsize, "seconds": seconds})
                print(json.dumps(rows[-1]), flush=True)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    meta = run_meta(argparse.Namespace(device=args.device, model=args.model, calib=args.calib, eval=args.heldout,
                                       eval2=None, nsamples=args.nsamples, seqlen=args.seqlen,
                                       eval_windows=args.heldout_windows), machine)
    write(meta, rows, Path(args.out), args.tag)


def write(meta: dict, rows: list[dict], out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"layer-choice-{meta['machine'].replace(' ', '-').replace('/', '-')}-{meta['date']}{tag}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"Machine {meta['machine']}, {meta['date']}, commit {meta['commit']}", f"`{meta['command']}`", "",
             "Held-out relative output error per linear (stored bits; clusters, and runs of G columns where cut):", "",
             "| layer | linear | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for key in dict.fromkeys((r["layer"], r["linear"]) for r in rows):
        cells = []
        for m in methods:
            r = next(x for x in rows if (x["layer"], x["linear"], x["method"]) == (*key, m))
            runs = f", G{r['groupsize']}" if r["groupsize"] > 0 and m != methods[0] else ""
            cells.append(f"{r['heldout_rel_err']:.5f} ({r['stored_bits']:.3f}; k{r['clusters']}{runs})")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios, median over linears (held-out error; calibration loss):", ""]
    by = {(r["layer"], r["linear"], r["method"]): r for r in rows}
    for i, a in enumerate(methods):
        for b in methods[:i]:
            keys = [k[:2] for k in by if k[2] == a]
            held_ratio = [by[(*k, a)]["heldout_rel_err"] / by[(*k, b)]["heldout_rel_err"] for k in keys]
            loss_ratio = [by[(*k, a)]["calib_loss"] / by[(*k, b)]["calib_loss"] for k in keys]
            lines.append(f"- {a} / {b}: held-out {statistics.median(held_ratio):.3f}x, calibration "
                         f"{statistics.median(loss_ratio):.3f}x ({sum(x < 1 for x in held_ratio)} of "
                         f"{len(held_ratio)} linears below 1 held out)")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
