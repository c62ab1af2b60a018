"""A few launches of the packed kernels for an external profiler (Nsight Compute): one synthetic
3.5-bit linear of bench.inference (default 4096x4096), three calls at one token (gemv_kernel), then
three at 16 tokens (the dense path: dequant_kernel, then cuBLAS). On a CUDA machine:

    S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
       --section MemoryWorkloadAnalysis --section LaunchStats"
    ncu -k regex:gemv_kernel --launch-skip 2 --launch-count 1 $S python -m bench.profile_launch 4096x4096
    ncu -k regex:dequant_kernel --launch-skip 2 --launch-count 1 $S python -m bench.profile_launch 4096x4096

The third launch of each is profiled (the first ones compile and build the work lists). Prints the
linear's width mask.
"""
import sys

import torch

from bench.inference import synthetic_parts
from mixed_linear import MixedBitLinear


def main() -> None:
    R, C = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "4096x4096").split("x"))
    dev = torch.device("cuda")
    m = MixedBitLinear.from_parts(synthetic_parts(R, C, 3.5, 0.0, seed=1, device=dev), bias=None,
                                  dtype=torch.float16, device=dev)
    for M in (1, 16):
        x = torch.randn(M, C, device=dev, dtype=torch.float16)
        for _ in range(3):
            m(x)
    torch.cuda.synchronize()
    print(f"{R}x{C} 3.5 bits, width mask {m.wmask}")


if __name__ == "__main__":
    main()
