"""One token on a CUDA machine: gemv_kernel's configurations on LLaMA-2-7B shapes at 3.0 and 3.5
stored bits (bench.inference's synthetic mixed-width linears), per linear and summed into a layer
(4 x 4096x4096, 2 x 11008x4096, 1 x 4096x11008), against fp16 F.linear. Each time is a CUDA graph
over 8 distinct copies of the linear (more bytes than the 50 MB L2), median of 15 replays.
Prints a line per case and a layer table; writes $OUT/gemv-sweep.json (default /tmp). Every
configuration is compiled first, in parallel processes (`mixed_kernel.warm_up`).

    python -m bench.gemv_sweep                      # all configurations
    python -m bench.gemv_sweep --configs 9 21 22    # some of them, by their index in CFGS
"""
import argparse
import json
import os
import sys

sys.path.insert(0, ".")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mixed_kernel  # noqa: E402
from bench.inference import graph_time, synthetic_parts  # noqa: E402
from mixed_linear import MixedBitLinear  # noqa: E402

BASE = dict(GEMV=True, BLOCK_M=1, BLOCK_N=128, TS=4, SPLIT=8, GATHER=True, num_warps=4)  # GEMV1 until 28f5a4b
CFGS = [dict(), dict(SPLIT=16), dict(SPLIT=4), dict(SPLIT=32), dict(BLOCK_N=64, num_warps=2, SPLIT=16),
        dict(BLOCK_N=64, num_warps=2), dict(BLOCK_N=64, num_warps=4, SPLIT=16), dict(BLOCK_N=256, num_warps=8, SPLIT=16),
        dict(GATHER=False),  # x gathered by index_select before the launch (one more kernel)
        dict(TS=2, SPLIT=16), dict(TS=2, SPLIT=8), dict(TS=2, SPLIT=24), dict(TS=2, SPLIT=32),
        dict(TS=1, SPLIT=16), dict(TS=1, SPLIT=32), dict(TS=1, SPLIT=8),
        dict(TS=2, SPLIT=16, BLOCK_N=256, num_warps=8), dict(TS=2, SPLIT=32, BLOCK_N=64, num_warps=2),
        dict(TS=1, SPLIT=32, BLOCK_N=64, num_warps=2), dict(TS=2, SPLIT=16, num_warps=8),
        dict(TS=1, SPLIT=16, BLOCK_N=256, num_warps=8),
        # codes decoded in place (INPLACE 1: the one-plane widths 2 and 4; 2: every width, its planes joined)
        dict(TS=2, SPLIT=16, INPLACE=1), dict(TS=2, SPLIT=16, INPLACE=2),
        # around GEMV1 (INPLACE 2): longer steps, smaller programs, a register cap for more programs per SM
        dict(TS=4, SPLIT=8, INPLACE=2), dict(TS=4, SPLIT=16, INPLACE=2), dict(TS=2, SPLIT=8, INPLACE=2),
        dict(TS=2, SPLIT=24, INPLACE=2), dict(TS=1, SPLIT=16, INPLACE=2),
        dict(TS=2, SPLIT=16, BLOCK_N=64, num_warps=2, INPLACE=2), dict(TS=2, SPLIT=16, BLOCK_N=32, num_warps=1, INPLACE=2),
        dict(TS=2, SPLIT=32, BLOCK_N=64, num_warps=1, INPLACE=2), dict(TS=2, SPLIT=16, BLOCK_N=256, num_warps=8, INPLACE=2),
        dict(TS=2, SPLIT=16, INPLACE=2, maxnreg=96), dict(TS=2, SPLIT=16, INPLACE=2, maxnreg=80),
        # mixed_gemv (Gluon: explicit layouts, x staged in shared memory once a program, the words streamed through a
        # ring of NS steps by asynchronous copies); rows a thread = BLOCK_N / 32 / warps. Until 4ece193 also NS 0 (register
        # prefetch) and ablation switches, gemv-sweep-NVIDIA-H200-2026-12-01-gluon.md
        dict(GLUON=True, XT=32, TS=1, SPLIT=16, BLOCK_N=256, NS=3), dict(GLUON=True, XT=32, TS=1, SPLIT=16, BLOCK_N=256, NS=4),
        dict(GLUON=True, XT=32, TS=1, SPLIT=16, BLOCK_N=256, NS=6), dict(GLUON=True, XT=32, TS=1, SPLIT=8, BLOCK_N=256, NS=4),
        dict(GLUON=True, XT=32, TS=1, SPLIT=16, NS=4), dict(GLUON=True, XT=32, TS=2, SPLIT=16, BLOCK_N=256, NS=3),
        dict(GLUON=True, XT=32, TS=1, SPLIT=12, BLOCK_N=256, NS=3), dict(GLUON=True, XT=32, TS=1, SPLIT=24, BLOCK_N=256, NS=3),
        dict(GLUON=True, XT=32, TS=1, SPLIT=16, BLOCK_N=512, NS=3)]
LAYER = [(4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1)]  # (out, in, linears of that shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", type=int, default=list(range(len(CFGS))),
                    help="indices into CFGS (default: all)")
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    res, layer = [], {}
    wmasks = {MixedBitLinear.from_parts(synthetic_parts(R, C, t, 0.0, seed=1, device="cpu"), bias=None,
                                        dtype=torch.float16, device="cpu").wmask
              for R, C, _ in LAYER for t in (3.5, 3.0)}
    mixed_kernel.warm_up([(dict(BASE, **CFGS[i], WMASK=m), torch.float16) for i in args.configs for m in wmasks],
                         processes=min(16, os.cpu_count() or 1))
    for R, C, n in LAYER:
        x = torch.randn(1, C, device=dev, dtype=torch.float16)
        ws = [torch.randn(R, C, device=dev, dtype=torch.float16) for _ in range(8)]
        fp16 = graph_time([lambda w=w: F.linear(x, w) for w in ws]) / 8 * 1e6
        del ws
        for target in (3.5, 3.0):
            parts = synthetic_parts(R, C, target, 0.0, seed=1, device=dev)
            mods = [MixedBitLinear.from_parts(parts, bias=None, dtype=torch.float16, device=dev) for _ in range(8)]
            ref = F.linear(x.float(), mods[0].dequantize(torch.float32))
            for i in args.configs:
                extra = CFGS[i]
                cfg = dict(BASE, **extra)
                for m in mods:
                    m.tune = cfg
                try:
                    err = float((mods[0](x).float() - ref).abs().max() / ref.abs().max())
                    t = graph_time([lambda m=m: m(x) for m in mods]) / 8 * 1e6
                except Exception as e:  # a configuration that does not compile is reported, not fatal
                    print(R, C, target, cfg, "failed", str(e)[:300], flush=True)
                    continue
                res.append(dict(shape=[R, C], bits=target, cfg=cfg, us=t, fp16_us=fp16, rel_err=err))
                acc = layer.setdefault((target, i), [0.0, 0.0])
                acc[0] += n * t
                acc[1] += n * fp16
                print(f"{R}x{C} {target} {str(extra):55s} {t:6.1f} us  fp16 {fp16:5.1f}  {fp16 / t:4.2f}x  err {err:.1e}",
                      flush=True)
    for (target, i), (t, f) in sorted(layer.items()):
        print(f"layer {target} {str(dict(BASE, **CFGS[i])):100s} {t:6.1f} us vs fp16 {f:6.1f}: {f / t:4.2f}x")
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv-sweep.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
