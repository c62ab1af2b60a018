"""The fused kernel against the dense path (dequant_kernel, then cuBLAS) and fp16 cuBLAS, per linear,
for one 3.5-bit synthetic linear of each shape at a few token counts (a quick check, not a report).

    python -m bench.dense_path                                    # on a CUDA GPU, ~1 minute
    python -m bench.dense_path --shapes 4096x4096 11008x4096 --tokens 16 32 128
    python -m bench.dense_path --tokens 16 --decode_configs 32x2 32x4 64x4   # the decode's rows x warps

Timing as in bench/inference.py: CUDA graphs over enough copies that they do not fit in L2, CUDA
events, median. 'fused' forces the fused kernel (pick_config's rule for the count, as if
DENSE_MIN_TOKENS were above it); 'dense' forces the dense path; 'decode' is dequant_kernel alone.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import mixed_kernel
from bench.inference import copies_for, graph_time, synthetic_parts
from mixed_linear import MixedBitLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="OUTxIN")
    ap.add_argument("--tokens", nargs="+", type=int, default=[16, 32, 128])
    ap.add_argument("--decode_configs", nargs="*", default=[],
                    help="also time the decode alone with these BLOCK_NxWARPS (e.g. 32x4)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda:0"), torch.float16
    for shape in args.shapes:
        R, C = (int(v) for v in shape.split("x"))
        m = MixedBitLinear.from_parts(synthetic_parts(R, C, 3.5, 0.0, seed=0, device=dev), None, dt, dev)
        mods = [m] + [copy.deepcopy(m) for _ in range(copies_for(m.packed_bytes()) - 1)]
        Ws = [torch.randn(R, C, device=dev, dtype=dt) for _ in range(copies_for(2 * R * C))]
        Wk = mixed_kernel.dense_workspace(dev, dt, R, C)
        tiles, kr = m.dequant_meta(dev)
        decode = graph_time([lambda mm=mm: mixed_kernel.dequantize_into(
            Wk, mm.qweight, tiles, kr, mm.scale_bits, mm.zero, mm.saved_dtype, mixed_kernel.DENSE)
            for mm in mods]) / len(mods)
        for c in args.decode_configs:
            bn, nw = (int(v) for v in c.split("x"))
            cfg = dict(mixed_kernel.DENSE, BLOCK_N=bn, num_warps=nw)
            tc = graph_time([lambda mm=mm: mixed_kernel.dequantize_into(
                Wk, mm.qweight, tiles, kr, mm.scale_bits, mm.zero, mm.saved_dtype, cfg) for mm in mods]) / len(mods)
            print(f"{R}x{C}: decode alone with BLOCK_N {bn}, {nw} warps: {tc * 1e6:.1f} us", flush=True)
        for M in args.tokens:
            x = torch.randn(M, C, device=dev, dtype=dt)
            t = {"fp16": graph_time([lambda w=w: F.linear(x, w) for w in Ws]) / len(Ws)}
            for name, cfg in (("fused", mixed_kernel.pick_config(M, R, C, dt, dense=False)), ("dense", mixed_kernel.DENSE)):
                for mm in mods:
                    mm.tune = cfg
                t[name] = graph_time([lambda mm=mm: mm(x) for mm in mods]) / len(mods)
            for mm in mods:
                mm.tune = None
            runs = "dense" if mixed_kernel.pick_config(M, R, C, dt).get("DENSE") else "fused"
            print(f"{R}x{C} M={M}: fp16 {t['fp16'] * 1e6:.1f} us, fused {t['fused'] * 1e6:.1f} us "
                  f"({t['fp16'] / t['fused']:.2f}x), dense {t['dense'] * 1e6:.1f} us ({t['fp16'] / t['dense']:.2f}x; "
                  f"decode alone {decode * 1e6:.1f} us); the forward runs {runs}", flush=True)


if __name__ == "__main__":
    main()
