"""Stage timings of compress_model (the CLI's whole-model loop) on a few random 7B-shaped
layers, on 1 and then 2 GPUs, to see what a whole-model run spends outside the per-layer
stages that bench/speed.py times (layer transfers, replication, reports).

    python -m bench.stage_profile          # needs 2 GPUs; prints one line per run

The three runs are 1 GPU, 2 GPUs, 2 GPUs (the first run also pays the Triton compile and
the embedding capture warm-up). Output is printed only; bench/results/multigpu-*.md quotes it.
"""
import time

import torch
from transformers import LlamaForCausalLM

from bench import speed
from compress import StageTimer, compress_model
from config import CompressConfig
from model_io import ARCHS

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cfg = speed.llama_config("7b", layers=3)
    with torch.device("cuda:0"):
        model = LlamaForCausalLM(cfg).half()
    model = model.cpu()
    model.eval()
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 32000, (1, 2048), generator=g) for _ in range(128)]
    ccfg = CompressConfig(**speed.METHODS["mi_50_t4.0_k10"])
    for n in (1, 2, 2):
        devs = [torch.device(f"cuda:{i}") for i in range(n)]
        timer = StageTimer(devs, enabled=True)
        t = time.perf_counter()
        compress_model(model, ARCHS["llama"], ccfg, windows, devs, torch.float16,
                       lambda e: print(f"layer {e['layer']} done in {e['seconds']:.1f}s") if e["event"] == "layer"
                       else None, timer=timer)
        print(n, f"{time.perf_counter() - t:.2f}s", {k: round(v, 2) for k, v in timer.seconds.items()}, flush=True)
