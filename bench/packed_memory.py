"""Bytes the packed runtime holds for a model's compressed linears against their bytes in the file
(CPU; the same buffers and the same count as bench.inference's GPU `linears_gpu_vs_file`): at load,
and in use, once the work lists of the one-token kernel (`split_units` for mixed_kernel.GEMV1) and of
the dense decode (`dequant_meta`) exist, as prefill and decoding build them. Per buffer in bits per
weight and as a share of the file. Writes bench/results/packed-memory-<tag>.json and .md.

    python -m bench.packed_memory PACKED_DIR --tag cpu-2026-12-01
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the modules of the checkout it runs in
import torch  # noqa: E402

import mixed_kernel  # noqa: E402
import packing  # noqa: E402
from bench.inference import file_bytes  # noqa: E402
from mixed_linear import MixedBitLinear  # noqa: E402


def measure(folder: str) -> dict:
    model = packing.load_packed(folder, dtype=torch.float16, device="cpu", keep_packed=True)
    mixed = {n: m for n, m in model.named_modules() if isinstance(m, MixedBitLinear)}
    stored = file_bytes(folder)  # reads the packed file's tensors: once
    file_b = sum(stored[n] for n in mixed)
    n_w = sum(m.in_features * m.out_features for m in mixed.values())
    buffers: dict[str, int] = {}
    for m in mixed.values():
        for name, b in m.named_buffers():
            buffers[name] = buffers.get(name, 0) + b.numel() * b.element_size()
    load = sum(m.packed_bytes() for m in mixed.values())
    cpu = torch.device("cpu")
    for m in mixed.values():
        m.split_units(mixed_kernel.GEMV1["SPLIT"], cpu)
        m.dequant_meta(cpu)
    use = sum(m.packed_bytes() for m in mixed.values())
    buffers["work lists"] = use - load
    return {"linears": len(mixed), "weights": n_w, "file_bytes": file_b, "load_bytes": load, "in_use_bytes": use,
            "load_vs_file": load / file_b, "in_use_vs_file": use / file_b, "file_bits_per_weight": 8 * file_b / n_w,
            "buffers_bits_per_weight": {k: 8 * v / n_w for k, v in buffers.items()},
            "buffers_share_of_file": {k: v / file_b for k, v in buffers.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("packed", help="folder of a --save_format packed save")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    r = measure(args.packed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    r.update(command="python -m bench.packed_memory " + " ".join(sys.argv[1:]), commit=commit,
             machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
             torch=torch.__version__)
    lines = [f"# Packed runtime memory against the file: {r['machine']}, {r['date']}", "",
             f"`{r['command']}` at commit {commit}, torch {r['torch']}", "",
             f"{r['linears']} compressed linears, {r['weights']} weights, {r['file_bits_per_weight']:.4f} bits per "
             f"weight in the file. **At load {r['load_vs_file']:.4f}x the file, in use {r['in_use_vs_file']:.4f}x.**",
             "", "| buffer | bits per weight | share of the file |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {100 * r['buffers_share_of_file'][k]:.2f}% |" for k, v in r["buffers_bits_per_weight"].items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"packed-memory-{args.tag}.json").write_text(json.dumps(r, indent=1))
    (out / f"packed-memory-{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
