"""Quality matrix: perplexity against stored bits for the baselines, the MI method and its
ablations, all on one loaded model (weights restored between rows), through the real
pipeline code.

    python -m bench.quality MODEL CALIB.txt EVAL.txt [--eval2 pydoc] [--set stored] [--seeds 0 1 2]
    python -m bench.quality ... --rows NAME ...          # chosen rows (see ROWS)
    python -m bench.quality ... --device cuda:0,cuda:1   # the same rows spread over two GPUs
    python -m bench.quality --merge A.json B.json --tag=-all  # runs made in pieces, as one file

Protocol of the anchors: calibration = 128 windows of 2048 tokens from CALIB tokenized as one
string (offsets from torch.Generator().manual_seed(seed)); evaluation = the first 128
non-overlapping 2048-token windows of EVAL, and of a second text that no calibration touches
(--eval2: a file, or `pydoc`, the Python documentation topics that ship with Python). Every
row records its weight bits, effective bits and stored bits (everything the packed file holds
for the linears, as the compression report counts it). Writes quality-<device>-<date>.json and
.md, with the median over seeds of each row.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress import compress_model
from config import CompressConfig
from datautils import get_eval_tokens, get_loaders
from events import summarize, versions
from layerwise import perplexity
from model_io import ARCHS, load_model, load_tokenizer
from parallel import device_list

U = dict(use_mi_grouping=False)
MSE = dict(clip="mse")


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

    # at equal stored bits: uniform act-order GPTQ (min-max and MSE grids) and its neighbours
    for b, g in ((3, 128), (3, 64), (2, 128), (2, 64), (4, 128)):
        rows[f"gptq_w{b}_g{g}_ao"] = dict(U, wbits=b, groupsize=g, act_order=True)
        rows[f"gptq_w{b}_g{g}_ao_mse"] = dict(U, **MSE, wbits=b, groupsize=g, act_order=True)
    rows["sparsegpt_50_w4_g128_ao_mse"] = dict(U, **MSE, sparsity=0.5, wbits=4, groupsize=128, act_order=True)
    rows["sparsegpt_50_w4_ao_mse"] = dict(U, **MSE, sparsity=0.5, wbits=4, act_order=True)
    # the method at stored budgets (number of clusters chosen per linear set)
    S = dict(**MSE, wbits=4, bits_budget="stored", n_groups=0)
    for t in (2.5, 3.16, 3.5, 4.0):
        rows[f"stored{t}_mi_hessian"] = dict(S, target_avg_bits=t)
    for t in (3.2, 4.0):
        rows[f"sparse50_stored{t}_mi_hessian"] = dict(S, sparsity=0.5, target_avg_bits=t)
        rows[f"sparse50_stored{t}_mi"] = dict(S, sparsity=0.5, target_avg_bits=t, grouping="mi")
    # the decomposition at 3.16 stored bits: what the groups, the Hessian, the MI and the grid each add
    for g in ("random", "contiguous", "hessian", "hessian_sim", "mi", "corr_hessian"):
        rows[f"stored3.16_{g}"] = dict(S, target_avg_bits=3.16, grouping=g)
    rows["stored3.16_mi_hessian_minmax"] = dict(S, target_avg_bits=3.16, clip="minmax")
    rows["stored3.16_mi_hessian_k10"] = dict(S, target_avg_bits=3.16, n_groups=10)
    # --true_sequential 0 (every set's Hessian from one forward pass over the uncompressed layer)
    rows["stored3.16_mi_hessian_one_pass"] = dict(S, target_avg_bits=3.16, true_sequential=False)
    rows["sparse50_stored4.0_mi_one_pass"] = dict(S, sparsity=0.5, target_avg_bits=4.0, grouping="mi",
                                                  true_sequential=False)
    rows["gptq_w3_g128_ao_one_pass_mse"] = dict(U, **MSE, wbits=3, groupsize=128, act_order=True,
                                                true_sequential=False)
    # --n_groups auto choosing by trial solves among whole clusters and clusters cut into runs of
    # 128 columns (the default since 2026-12-01); the rows above keep the proxy's choice among
    # whole clusters they were measured with
    T = dict(auto_select="solve", auto_groupsize=128)
    for t in (2.5, 3.16, 3.5, 4.0):
        rows[f"stored{t}_mi_hessian_trials"] = dict(S, **T, target_avg_bits=t)
    rows["stored3.16_hessian_sim_trials"] = dict(S, **T, target_avg_bits=3.16, grouping="hessian_sim")
    rows["sparse50_stored4.0_mi_trials"] = dict(S, **T, sparsity=0.5, target_avg_bits=4.0, grouping="mi")
    # the two halves of that default apart: trial solves among whole clusters only, and the proxy
    # choosing among whole clusters and clusters cut into runs
    rows["stored3.16_mi_hessian_trials_g0"] = dict(S, auto_select="solve", auto_groupsize=0, target_avg_bits=3.16)
    rows["stored3.16_mi_hessian_proxy_g128"] = dict(S, auto_select="proxy", auto_groupsize=128, target_avg_bits=3.16)
    # every row names its grid and its choice of clusters: the rows without MSE were measured with
    # min-max grids (the default until --clip mse became it), the auto rows without trials by the
    # proxy alone, and must not follow a later change of the defaults
    return {name: {"clip": "minmax", "auto_select": "proxy", "auto_groupsize": 0, **row} for name, row in rows.items()}


ROWS = _rows()
SETS = {  # the rows of issue-sized studies, in the order they are run (most needed first)
    "stored": ["fp16", "gptq_w3_g128_ao_mse", "stored3.16_mi_hessian", "gptq_w3_g128_ao", "stored2.5_mi_hessian",
               "gptq_w2_g128_ao_mse", "gptq_w3_g64_ao_mse", "stored3.5_mi_hessian"],
    "sparse": ["sparsegpt_50_w4_g128_ao_mse", "sparse50_stored4.0_mi_hessian", "sparse50_stored4.0_mi",
               "sparsegpt_50"],
    "decomposition": ["stored3.16_hessian_sim", "stored3.16_random", "stored3.16_mi", "stored3.16_corr_hessian",
                      "stored3.16_mi_hessian_minmax", "stored3.16_hessian", "stored3.16_contiguous",
                      "stored3.16_mi_hessian_k10"],
    "second_model": ["fp16", "gptq_w3_g128_ao_mse", "stored3.16_mi_hessian", "gptq_w3_g128_ao"],
    "trials": ["fp16", "gptq_w3_g128_ao", "gptq_w3_g128_ao_mse", "stored3.16_mi_hessian_trials", "stored3.16_mi_hessian",
               "stored2.5_mi_hessian_trials", "sparse50_stored4.0_mi_trials", "stored3.16_hessian_sim_trials"],
    "one_pass": ["stored3.16_mi_hessian", "stored3.16_mi_hessian_one_pass", "sparse50_stored4.0_mi",
                 "sparse50_stored4.0_mi_one_pass", "gptq_w3_g128_ao_mse", "gptq_w3_g128_ao_one_pass_mse"],
}


def second_text(spec: str | None) -> Path | None:
    """--eval2: a file, or `pydoc` (the Python documentation topics, written to a temporary file)."""
    if not spec:
        return None
    if spec != "pydoc":
        return Path(spec)
    import pydoc_data.topics as topics
    path = Path(tempfile.mkdtemp(prefix="eval2-")) / "pydoc.txt"
    path.write_text("\n\n".join(topics.topics.values()))
    return path


def cpu_name() -> str:
    """The processor's model name and how many cores this process may use, e.g. "AMD EPYC 2 cores"."""
    name = platform.processor() or "cpu"
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def medians(results: list[dict]) -> list[dict]:
    """Per row: the median over seeds of each perplexity and of the bits."""
    out = []
    for name in dict.fromkeys(r["row"] for r in results):
        rs = sorted((r for r in results if r["row"] == name), key=lambda r: r["seed"])
        row = {"row": name, "seeds": [r["seed"] for r in rs]}
        for k in ("wiki_ppl", "eval2_ppl", "avg_bits", "effective_bits", "stored_bits", "sparsity"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[k] = statistics.median(vals) if vals else None
            if k.endswith("ppl"):
                row[k + "_all"] = vals
        out.append(row)
    return out


def run_meta(args, device_name: str) -> dict:
    """What a results file says about the run that made it."""
    return {"machine": device_name, "date": datetime.date.today().isoformat(), "commit": versions().get("commit"),
            "command": " ".join(sys.argv), "versions": versions(), "devices": args.device, "model": args.model,
            "calibration": args.calib, "eval": args.eval, "eval2": args.eval2,
            "protocol": {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows}}


def merge_files(paths: list[str]) -> tuple[dict, list[dict]]:
    """Rows of several results files (runs cut into pieces: seeds on several processes or calls)
    as one: every row keeps its file's commit and command; the files must share the machine,
    model, texts and protocol. The merged header lists the sources."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    same = ("machine", "model", "calibration", "eval", "eval2", "protocol")
    for p, r in zip(paths[1:], runs[1:]):
        diff = [k for k in same if r.get(k) != runs[0].get(k)]
        if diff:
            sys.exit(f"{p}: {', '.join(diff)} differ from {paths[0]}; only runs of one protocol merge")
    rows = [{**row, "commit": row.get("commit", r["commit"]), "command": row.get("command", r["command"])}
            for r in runs for row in r["rows"]]
    commits = sorted({row["commit"] or "?" for row in rows})
    meta = {**{k: runs[0].get(k) for k in same}, "date": max(r["date"] for r in runs), "commit": ", ".join(commits),
            "command": "python -m bench.quality --merge " + " ".join(Path(p).name for p in paths),
            "versions": runs[0].get("versions"), "devices": runs[0].get("devices"),
            "sources": [{"file": Path(p).name, "commit": r["commit"], "command": r["command"]}
                        for p, r in zip(paths, runs)]}
    return meta, rows


def write_results(meta: dict, results: list[dict], out_dir: str, tag: str) -> Path:
    """Results so far as JSON and a markdown table (rewritten after every row)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = meta["machine"].replace(" ", "-").replace("/", "-")
    stem = f"quality-{slug}-{meta['date']}{tag}"
    device_name, date, commit = meta["machine"], meta["date"], meta["commit"]
    med = medians(results)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": results, "medians": med}, indent=1))
    sources = [f"- {x['file']}: commit {x['commit']}, `{x['command']}`" for x in meta.get("sources", [])]

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)
    lines = [f"Machine {device_name}, {date}, commit {commit}, devices {meta['devices']}", f"`{meta['command']}`", "",
             *(["Merged from:", *sources, ""] if sources else []),
             "Medians over the seeds (each seed's value in brackets):", "",
             "| row | wiki ppl | eval2 ppl | stored bits | weight bits | effective bits | sparsity |",
             "|---|---|---|---|---|---|---|"]
    for r in med:
        lines.append(f"| {r['row']} | {f(r['wiki_ppl'], '.2f')} ({', '.join(f'{v:.2f}' for v in r['wiki_ppl_all'])}) "
                     f"| {f(r['eval2_ppl'], '.2f')} ({', '.join(f'{v:.2f}' for v in r['eval2_ppl_all'])}) "
                     f"| {f(r['stored_bits'], '.3f')} | {f(r['avg_bits'], '.3f')} | {f(r['effective_bits'], '.3f')} "
                     f"| {f(r['sparsity'], '.3f')} |")
    lines += ["", "Every run:", "", "| row | seed | wiki ppl | eval2 ppl | stored bits | weight bits | seconds |"
              + (" commit |" if sources else ""), "|---|---|---|---|---|---|---|" + ("---|" if sources else "")]
    lines += [f"| {r['row']} | {r['seed']} | {r['wiki_ppl']:.2f} | {f(r.get('eval2_ppl'), '.2f')} | "
              f"{r['stored_bits']:.3f} | {r['avg_bits']:.3f} | {r['seconds']:.1f} |"
              + (f" {r.get('commit')} |" if sources else "") for r in results]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out / stem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    p.add_argument("calib", nargs="?")
    p.add_argument("eval", nargs="?")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="combine results files of one protocol (e.g. seeds run as separate processes) into one "
                        "file with medians, written to --out with --tag; nothing is run")
    p.add_argument("--eval2", default=None, help="a second evaluation text: a file, or `pydoc`")
    p.add_argument("--rows", nargs="+", default=None, help="row names: " + " ".join(ROWS))
    p.add_argument("--set", nargs="+", default=None, choices=list(SETS), help="named sets of rows: " +
                   "; ".join(f"{k}: {' '.join(v)}" for k, v in SETS.items()))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval_windows", type=int, default=128)
    p.add_argument("--device", default="cuda:0", help="device, or several comma-separated (cuda:0,cuda:1)")
    p.add_argument("--dtype", default=None, choices=["float16", "float32"], help="default: float16 on a GPU")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (one row per seed)")
    args = p.parse_args()
    if args.merge:
        meta, rows = merge_files(args.merge)
        stem = write_results(meta, rows, args.out, args.tag)
        print(f"wrote {stem}.json/.md")
        return
    if not (args.model and args.calib and args.eval):
        p.error("MODEL, CALIB and EVAL are required (or --merge)")
    names = list(args.rows or []) + [r for s in (args.set or []) for r in SETS[s]]
    names = list(dict.fromkeys(names or list(ROWS)))
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}")

    devs = device_list(args.device)
    dev = devs[0]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    tok = load_tokenizer(args.model, False)
    model = load_model(args.model, dtype, False)
    spec = ARCHS[model.config.model_type]
    tokens = get_eval_tokens(args.eval, tok, args.seqlen)
    eval2 = second_text(args.eval2)
    tokens2 = get_eval_tokens(str(eval2), tok, args.seqlen) if eval2 else None
    original = {k: v.clone() for k, v in model.state_dict().items()}
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    meta = run_meta(args, device_name)
    results = []
    windows_of: dict[int, list] = {}
    for name in names:  # row after row, every seed of a row together: a cut-short run keeps whole rows
        for seed in args.seeds:
            if name == "fp16" and seed != args.seeds[0]:
                continue  # nothing calibrated: the same for every seed
            if seed not in windows_of:
                windows_of[seed] = get_loaders(args.calib, tok, args.nsamples, seed, args.seqlen)
            windows = windows_of[seed]
            model.load_state_dict(original)
            cfg = CompressConfig(**ROWS[name], seed=seed)
            torch.manual_seed(0)
            tick = time.perf_counter()
            if name == "fp16":
                summary = {"avg_bits": 16.0, "effective_bits": 16.0, "stored_bits": 16.0, "sparsity": 0.0,
                           "bits_histogram": {"16": 1.0}}
                groups = None
            else:
                reports = compress_model(model, spec, cfg, windows, devs, dtype).reports
                summary = summarize(reports)
                groups = sorted(len(r.groups) for r in reports.values())
            secs = time.perf_counter() - tick
            ppl = perplexity(model, spec, tokens, args.seqlen, devs, dtype, args.eval_windows)
            ppl2 = perplexity(model, spec, tokens2, args.seqlen, devs, dtype, args.eval_windows) if eval2 else None
            row = {"row": name, "seed": seed, "config": ROWS[name], "wiki_ppl": ppl, "eval2_ppl": ppl2,
                   "seconds": secs, "groups_per_linear": None if groups is None else
                   {"min": groups[0], "median": statistics.median(groups), "max": groups[-1]}, **summary}
            results.append(row)
            print(f"{name:32s} seed {seed} ppl {ppl:9.3f}  eval2 {ppl2 or 0:9.3f}  stored {summary['stored_bits']:.3f}  "
                  f"bits {summary['avg_bits']:.3f}  sparsity {summary['sparsity']:.3f}  {secs:6.1f}s", flush=True)
            write_results(meta, results, args.out, args.tag)

    stem = write_results(meta, results, args.out, args.tag)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
