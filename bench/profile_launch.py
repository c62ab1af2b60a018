"""A few launches of the packed kernels for an external profiler (Nsight Compute).

Default: one synthetic 3.5-bit linear of bench.inference (default 4096x4096), three calls at one token
(pick_config's kernel), then three at 16 tokens (the dense path: dequant_kernel, then cuBLAS).
`--layer`: the linears of a LLaMA-2-7B layer (or `--layer 70b`) at one token as a loaded model runs
them: q/k/v and gate/up as one launch each (`mixed_linear.SharedInputGroup`), o and down alone, three
passes. On a CUDA machine:

    S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
       --section MemoryWorkloadAnalysis --section LaunchStats"
    ncu -k regex:gemv_kernel --launch-skip 2 --launch-count 1 $S python -m bench.profile_launch 4096x4096
    ncu -k regex:dequant_kernel --launch-skip 2 --launch-count 1 $S python -m bench.profile_launch 4096x4096
    ncu --clock-control none --set full -k regex:gemv_gl --launch-skip 8 --launch-count 4 \
        -o /tmp/layer python -m bench.profile_launch --layer 7b --bits 3.5

The first launches compile and build the work lists; profile a later pass. Prints the width masks.
"""
import argparse

import torch

from bench.inference import synthetic_linear
from mixed_linear import SharedInputGroup

LAYERS = {"7b": (4096, 4096, 11008, 4096), "70b": (8192, 1024, 28672, 8192)}  # hidden, k/v rows, mlp, -


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", nargs="?", default="4096x4096", help="RxC of the single linear (default mode)")
    ap.add_argument("--layer", choices=sorted(LAYERS), help="a whole layer at one token, grouped as loaded")
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.layer:
        H, KV, F, _ = LAYERS[args.layer]
        qkv = [synthetic_linear(r, H, args.bits, i, dev) for i, r in enumerate((H, KV, KV))]
        gu = [synthetic_linear(F, H, args.bits, 3 + i, dev) for i in range(2)]
        o, down = synthetic_linear(H, H, args.bits, 5, dev), synthetic_linear(H, F, args.bits, 6, dev)
        SharedInputGroup(qkv)
        SharedInputGroup(gu)
        xa, xo = torch.randn(1, H, device=dev, dtype=torch.float16), torch.randn(1, H, device=dev, dtype=torch.float16)
        xm, xd = torch.randn(1, H, device=dev, dtype=torch.float16), torch.randn(1, F, device=dev, dtype=torch.float16)
        for _ in range(args.passes):  # launches in model order: q/k/v, o, gate/up, down
            for m in qkv:
                m(xa)
            o(xo)
            for m in gu:
                m(xm)
            down(xd)
        torch.cuda.synchronize()
        print(f"{args.layer} layer at {args.bits} bits: width masks q {qkv[0].wmask} o {o.wmask} down {down.wmask}")
        return
    R, C = (int(v) for v in args.shape.split("x"))
    m = synthetic_linear(R, C, args.bits, 1, dev)
    for M in (1, 16):
        x = torch.randn(M, C, device=dev, dtype=torch.float16)
        for _ in range(3):
            m(x)
    torch.cuda.synchronize()
    print(f"{R}x{C} {args.bits} bits, width mask {m.wmask}")


if __name__ == "__main__":
    main()
