"""Where one decoder layer's compression spends its GPU and host time: torch.profiler over
`compress.compress_layer` (the code the CLI runs) on a random LLaMA-shaped layer, on 1 GPU
and then on every listed GPU count, after a warm-up.

    python -m bench.layer_profile [--shape 7b] [--method mi_50_t4.0_k10] [--gpus 1 2] [--out DIR]
                                  [--min_split_rows N]

Prints, per GPU count: the stage seconds (devices synchronized at stage boundaries, as
bench/speed.py), then the CUDA kernels and the host-side operators ranked by their total time,
and writes the same tables to layer-profile-<device>-<date>-<shape>-<method>.txt in --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.speed import METHODS, SHAPES, layer_inputs, random_layer, run_meta
from compress import StageTimer, compress_layer
from config import CompressConfig
from layerwise import Team
from model_io import ARCHS
from parallel import replicate, scatter, to_device


def profile_layer(shape: str, method: str, nsamples: int, seqlen: int, devs: list, rows: int) -> str:
    cfg, layer, original = random_layer(shape, devs[0])
    inps, kwargs = layer_inputs(cfg, nsamples, seqlen, devs[0])
    kw = [kwargs] + [to_device(kwargs, d) for d in devs[1:]]
    ccfg = CompressConfig(**METHODS[method])

    def once(x, timer):
        layer.load_state_dict(original)
        team = Team(devs, scatter(x, devs), kw, 4)
        team.layers = replicate(layer, devs)
        compress_layer(team, 0, ARCHS["llama"], ccfg, timer=timer)
        with timer("forward outputs"):
            team.forward(in_place=True)
        for d in devs:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    once(inps[:8], StageTimer(devs, enabled=False))  # warm-up: Triton compiles, cuBLAS handles
    timer = StageTimer(devs, enabled=True)
    once(inps, timer)
    stages = "stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in timer.seconds.items()) + \
        f", sum {sum(timer.seconds.values()):.3f}"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        once(inps, StageTimer(devs, enabled=False))
    ka = prof.key_averages()
    cuda = ka.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    host = ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)
    del inps, layer
    torch.cuda.empty_cache()
    return (f"== {shape} {method}, {len(devs)} GPU(s): {[str(d) for d in devs]}\n{stages}\n\n"
            f"-- by device time\n{cuda}\n-- by host time\n{host}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=list(SHAPES))
    p.add_argument("--method", default="mi_50_t4.0_k10", choices=list(METHODS))
    p.add_argument("--gpus", nargs="*", type=int, default=[1])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--min_split_rows", type=int, default=None,
                   help="override parallel.MIN_SPLIT_ROWS (1: split every solve by rows over the GPUs)")
    args = p.parse_args()
    if args.min_split_rows is not None:
        import parallel
        parallel.MIN_SPLIT_ROWS = args.min_split_rows
    torch.set_grad_enabled(False)
    machine = torch.cuda.get_device_name(0).replace(" ", "-")
    meta, folder = run_meta(machine, args.out)
    text = [f"Machine {machine} x{torch.cuda.device_count()}, {meta['date']}, commit {meta['commit']}\n"
            f"`{meta['command']}`\n"]
    for n in args.gpus:
        part = profile_layer(args.shape, args.method, args.nsamples, args.seqlen,
                             [torch.device(f"cuda:{i}") for i in range(n)], args.rows)
        print(part, flush=True)
        text.append(part)
    path = folder / f"layer-profile-{machine}-{meta['date']}-{args.shape}-{args.method}{args.tag}.txt"
    path.write_text("\n".join(text))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
