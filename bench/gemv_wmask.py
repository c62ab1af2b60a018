"""One token on a CUDA machine: gemv_kernel with every width compiled in (WMASK 510, as before
6e58dd4) against only the linear's width range (MixedBitLinear.wmask), a register cap (maxnreg
128), SPLIT 16 and 2 tiles a step; LLaMA-2-7B shapes, bench.inference's synthetic 3.0 and 3.5-bit
linears and one run of 4 bits; x gathered before the launch and a single part (no split-K finish),
to attribute what is around the step loop (bench/gemv_step_probe.py: the loop alone is about twice
as fast); per linear, CUDA graph over 8 copies, median. Prints a line per
case and writes $OUT/probe-wmask.json (default /tmp); results are written up with machine,
date, command and commit.

    python -m bench.gemv_wmask
"""
import sys, json, os
sys.path.insert(0, ".")
import torch, torch.nn.functional as F
import mixed_kernel
from mixed_linear import MixedBitLinear
from bench.inference import graph_time, synthetic_parts

dev = torch.device("cuda:0")
res = []
def parts_runs(R, C, n_runs, b, seed=3):
    g = torch.Generator(device=dev).manual_seed(seed)
    cuts = [C * i // n_runs for i in range(n_runs + 1)]
    return {"codes": torch.randint(0, 2 ** b, (R, C), generator=g, device=dev, dtype=torch.int32), "keep": None,
            "scale": (torch.rand(R, n_runs, generator=g, device=dev) * 2e-3 + 1e-4).half().float(),
            "zero": torch.randint(0, 2 ** b, (R, n_runs), generator=g, device=dev).float(),
            "perm": torch.randperm(C), "runs": [(cuts[i], cuts[i + 1], b) for i in range(n_runs)], "avg_bits": float(b)}
for R, C in [(4096, 4096), (11008, 4096), (4096, 11008)]:
    xx = torch.randn(1, C, device=dev, dtype=torch.float16)
    ww = [torch.randn(R, C, device=dev, dtype=torch.float16) for _ in range(8)]
    fp16 = graph_time([lambda w=w: F.linear(xx, w) for w in ww]) / 8 * 1e6
    del ww
    for label, parts in [("3.5 mixed", synthetic_parts(R, C, 3.5, 0.0, seed=1, device=dev)),
                         ("3.0 mixed", synthetic_parts(R, C, 3.0, 0.0, seed=1, device=dev)),
                         ("4 bits, 1 run", parts_runs(R, C, 1, 4))]:
        mods = [MixedBitLinear.from_parts(parts, bias=None, dtype=torch.float16, device=dev) for _ in range(8)]
        ref = F.linear(xx.float(), mods[0].dequantize(torch.float32))
        for name, extra in [("all widths", {"WMASK": mixed_kernel.WMASK_ALL}), ("own widths", {}),
                            ("own, maxnreg 128", {"maxnreg": 128}), ("own, split 16", {"SPLIT": 16}),
                            ("own, ts2", {"TS": 2}),
                            # what is around the step: x gathered before the launch (no kcols loads
                            # in the kernel), and no split-K finish (one part, smaller row tiles)
                            ("own, x pre-gathered", {"GATHER": False}),
                            ("own, SPLIT 1, 32 rows", {"SPLIT": 1, "BLOCK_N": 32}),
                            ("own, SPLIT 1, 16 rows", {"SPLIT": 1, "BLOCK_N": 16, "num_warps": 2})]:
            for mm in mods:
                mm.tune = dict(mixed_kernel.GEMV1, **extra)
            try:
                out = mods[0](xx).float()
                err = float((out - ref).abs().max() / ref.abs().max())
                t = graph_time([lambda mm=mm: mm(xx) for mm in mods]) / 8 * 1e6
            except Exception as e:
                print(R, C, label, name, "failed", str(e)[:300], flush=True)
                continue
            row = dict(shape=[R, C], layout=label, variant=name, us=t, fp16_us=fp16, vs_fp16=fp16 / t, rel_err=err,
                       widths=mods[0].widths(), GBps=mods[0].packed_bytes() / t / 1e3)
            res.append(row)
            print(f"{R}x{C} {label:14s} {name:18s} {t:6.1f} us  fp16 {fp16:5.1f}  {fp16 / t:4.2f}x  {row['GBps']:5.0f} GB/s  err {err:.1e}", flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe-wmask.json"), "w"), indent=1)
