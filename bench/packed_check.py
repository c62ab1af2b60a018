"""Packed save and reload of a real model: the packed checkpoint must rebuild the dense (fake)
save bit for bit, on the device it is loaded to, and its size is recorded.

    python -m bench.packed_check MODEL CALIB.txt EVAL.txt [--nsamples 128] [--device cuda:0]

For each configuration the model is compressed once (compress.compress_model, the CLI's
code), saved both ways (model_io.save_model), and reloaded: the fake save with plain
`AutoModelForCausalLM.from_pretrained`, the packed one with `packing.load_packed`. Logits of
both on the first evaluation windows are compared with torch.equal, on the device and on
the CPU; perplexity of the packed reload is evaluated on EVAL.txt. Writes
packed-<device>-<date>.json and .md in bench/results (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import packing
from compress import compress_model
from config import CompressConfig
from events import versions
from layerwise import perplexity
from model_io import ARCHS, load_model, load_tokenizer, save_model

CONFIGS = {
    "mi_t3.5_k10": dict(wbits=4, target_avg_bits=3.5, n_groups=10),
    "sparse50_mi_t4.0_k10": dict(sparsity=0.5, wbits=4, target_avg_bits=4.0, n_groups=10),
    "nm24_mi_t3.0_k10": dict(prunen=2, prunem=4, wbits=4, target_avg_bits=3.0, n_groups=10),
    "gptq_w4_g128": dict(use_mi_grouping=False, wbits=4, groupsize=128),
}


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def check(name: str, fields: dict, args, tok, windows, tokens, dev) -> dict:
    from transformers import AutoModelForCausalLM
    cfg = CompressConfig(**fields)
    model = load_model(args.model, torch.float16, False)
    tick = time.perf_counter()
    reports = compress_model(model, ARCHS[model.config.model_type], cfg, windows, dev, torch.float16).reports
    seconds = time.perf_counter() - tick
    root = Path(tempfile.mkdtemp(prefix="packed-check-"))
    try:
        fake, packed = root / "fake", root / "packed"
        save_model(model, tok, str(fake), {}, overwrite=True)
        report: dict = {}
        save_model(model, tok, str(packed), report, overwrite=True, packed={
            "reports": reports, "nm": (cfg.prunen, cfg.prunem), "pruned": bool(cfg.sparsity or cfg.prunen)})
        ids = tokens[:, :2 * args.seqlen].reshape(2, args.seqlen)
        equal = {}
        for where in (str(dev), "cpu"):
            a = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float16).to(where).eval()
            b = packing.load_packed(packed, dtype=torch.float16, device=where)
            wa = {k: v for k, v in a.state_dict().items()}
            wb = b.state_dict()
            equal[f"weights_{where}"] = all(torch.equal(wa[k], wb[k]) for k in wa)
            if where != "cpu":  # fp16 matmuls on the CPU are slow; weights equal there is the check
                la = a(ids.to(where)).logits
                lb = b(ids.to(where)).logits
                equal[f"logits_{where}"] = bool(torch.equal(la, lb))
            del a, b
        reloaded = packing.load_packed(packed, dtype=torch.float16, device="cpu")
        ppl = perplexity(reloaded, ARCHS[reloaded.config.model_type], tokens, args.seqlen, dev, torch.float16,
                            args.eval_windows)
        row = {"config": name, "fields": fields, "compress_s": seconds, "ppl_packed_reload": ppl, "equal": equal,
               "fake_bytes": folder_bytes(fake), "packed_bytes": folder_bytes(packed, "packed*.safetensors*"),
               "gptq_bytes": folder_bytes(packed / "gptq") if (packed / "gptq").exists() else None,
               "disk": report["disk"], "disk_line": packing.describe_disk(report["disk"])}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{name}: {json.dumps(row['equal'])}  ppl {ppl:.3f}  {row['disk_line']}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("calib")
    p.add_argument("eval")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval_windows", type=int, default=0)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    from datautils import get_eval_tokens, get_loaders
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    tok = load_tokenizer(args.model, False)
    windows = get_loaders(args.calib, tok, args.nsamples, 0, args.seqlen)
    tokens = get_eval_tokens(args.eval, tok, args.seqlen)
    rows = [check(n, CONFIGS[n], args, tok, windows, tokens, dev) for n in args.configs]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    meta = {"machine": name, "date": date, "commit": versions().get("commit"), "command": " ".join(sys.argv),
            "versions": versions()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"packed-{name.replace(' ', '-')}-{date}{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"Machine {name}, {date}, commit {meta['commit']}", f"`{meta['command']}`", "",
             "| config | weights equal (GPU, CPU) | logits equal (GPU) | ppl of packed reload | fake MiB | "
             "packed MiB | ratio vs fp16 | bits/weight in quantized linears | GPTQ copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, d = r["equal"], r["disk"]
        gq = d.get("gptq", {})
        lines.append(f"| {r['config']} | {e.get(f'weights_{dev}')}, {e.get('weights_cpu')} | {e.get(f'logits_{dev}')} | "
                     f"{r['ppl_packed_reload']:.3f} | {r['fake_bytes'] / 2**20:.1f} | {r['packed_bytes'] / 2**20:.1f} | "
                     f"{d['ratio_vs_fp16']:.2f}x | {d['quantized_linears']['bits_per_weight']:.2f} | "
                     f"{(str(round(r['gptq_bytes'] / 2**20, 1)) + ' MiB') if gq.get('written') else gq.get('reason')} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md")


if __name__ == "__main__":
    main()
