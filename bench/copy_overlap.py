"""How much a layer's file traffic on a worker thread slows the GPU's work (host_copy.py).

A fixed chain of fp16 matmuls on the default stream stands in for a layer's compression. It runs
alone, then while a worker thread copies one 70B-shaped decoder layer's weights (1.6 GiB of fp16
in nine tensors) from pageable host memory to the GPU and another back to pageable host memory:
once with plain `.to()` copies (what the read-ahead and write-behind did before host_copy) and
once staged beside the GPU's work (`host_copy.side_copies`). Reported: the chain's time between
CUDA events on the default stream (medians of --repeats runs, after a warm-up), the worker's
copy time, and the slowdown against the chain alone.

    python -m bench.copy_overlap --out bench/results       # on a CUDA machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

import host_copy

# one 70B-shaped decoder layer: q, k, v, o, gate, up, down
SHAPES_70B = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192), (8192, 28672)]


def chain(x: torch.Tensor, w: torch.Tensor, steps: int) -> float:
    """ms of `steps` matmuls on the default stream, between CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        x = torch.nn.functional.linear(x, w)
        x = x / x.abs().amax().clamp_min(1)  # keep the values finite; another small kernel per step
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def traffic(host: list[torch.Tensor], gpu: list[torch.Tensor], staged: bool, out: dict) -> None:
    """Read `host` onto the GPU and `gpu` back to the host, as the layer files are."""
    tick = time.perf_counter()
    if staged:
        with host_copy.side_copies():
            up = [host_copy.to_device(t, "cuda") for t in host]
            down = [host_copy.to_host(t) for t in gpu]
    else:
        up = [t.to("cuda") for t in host]
        down = [t.to("cpu") for t in gpu]
        torch.cuda.synchronize()
    out["copy_s"] = time.perf_counter() - tick
    del up, down


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="matmuls in the chain (8192 x 8192 fp16 each)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(4096, 8192, device=dev, dtype=torch.float16)
    w = torch.randn(8192, 8192, device=dev, dtype=torch.float16) / 90
    host = [torch.randn(s, dtype=torch.float16) for s in SHAPES_70B]  # pageable, as read from a file
    gpu = [torch.randn(s, device=dev, dtype=torch.float16) for s in SHAPES_70B]
    gib = sum(t.numel() * 2 for t in host) / 2 ** 30
    chain(x, w, 20)
    for staged in (False, True):  # warm-up: pinned buffers, streams
        traffic(host[:1], gpu[:1], staged, {})
    rows = {}
    for mode in ("alone", "plain copies", "staged copies"):
        times, copies = [], []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            info: dict = {}
            worker = None
            if mode != "alone":
                worker = threading.Thread(target=traffic, args=(host, gpu, mode == "staged copies", info))
                worker.start()
            times.append(chain(x, w, args.steps))
            if worker is not None:
                worker.join()
                copies.append(info["copy_s"])
        rows[mode] = {"chain_ms": statistics.median(times), "chain_ms_all": times,
                      "copy_s": statistics.median(copies) if copies else None}
        print(mode, rows[mode], flush=True)
    base = rows["alone"]["chain_ms"]
    for r in rows.values():
        r["slowdown"] = r["chain_ms"] / base
    name = torch.cuda.get_device_name().replace(" ", "-")
    date = time.strftime("%Y-%m-%d")
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                            text=True).stdout.strip()
    meta = {"machine": name, "host": platform.node(), "date": date, "commit": commit,
            "command": "python -m bench.copy_overlap " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
            "layer_gib": gib, "steps": args.steps, "repeats": args.repeats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"copy-overlap-{name}-{date}{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"Machine {name}, {date}, commit {commit}", f"`{meta['command']}`", "",
             f"A chain of {args.steps} fp16 matmuls (4096 x 8192 by 8192 x 8192) on the default stream, alone and "
             f"while a worker thread reads one 70B-shaped layer ({gib:.2f} GiB fp16) from pageable host memory onto "
             "the GPU and writes another back; medians of "
             f"{args.repeats} runs.", "",
             "| worker | chain ms | slowdown | copy s (up + down) |", "|---|---|---|---|"]
    for mode, r in rows.items():
        copy = "" if r["copy_s"] is None else f"{r['copy_s']:.2f}"
        lines.append(f"| {mode} | {r['chain_ms']:.1f} | {r['slowdown']:.3f}x | {copy} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md", flush=True)


if __name__ == "__main__":
    main()
