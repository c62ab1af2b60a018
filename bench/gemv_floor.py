"""Where a one-token linear's time goes (a CUDA machine): the same launch with its work removed
piece by piece, against fp16 cuBLAS, on LLaMA-2-7B shapes at 3.5 stored bits (bench.inference's
synthetic linears). Each time is a CUDA graph over 8 distinct copies, median of 15 replays.

    python -m bench.gemv_floor

Rows: an empty Triton kernel (the floor of a launch in a graph); cuBLAS fp16 on a 128x128 weight
(its floor) and on the shape; a device copy of the packed words' bytes (the bandwidth at that
size); then gemv_kernel (GEMV1) and mixed_gemv (Gluon) with every part empty (programs that only
read their part offsets and run the split-K finish), and whole. Writes $OUT/gemv-floor.json."""
import json
import os
import sys

sys.path.insert(0, ".")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import mixed_kernel  # noqa: E402
from bench.inference import graph_time, synthetic_parts  # noqa: E402
from mixed_linear import MixedBitLinear  # noqa: E402

@triton.jit
def _empty(p):
    tl.store(p + tl.program_id(0), 1.0)


def us(calls: list) -> float:
    return graph_time(calls) / len(calls) * 1e6


def main() -> None:
    dev = torch.device("cuda:0")
    res = []
    z = torch.zeros(1024, device=dev)
    res.append(dict(case="empty Triton kernel, 1 program", us=us([lambda: _empty[(1,)](z) for _ in range(8)])))
    res.append(dict(case="empty Triton kernel, 512 programs", us=us([lambda: _empty[(512,)](z) for _ in range(8)])))
    x128 = torch.randn(1, 128, device=dev, dtype=torch.float16)
    w128 = [torch.randn(128, 128, device=dev, dtype=torch.float16) for _ in range(8)]
    res.append(dict(case="fp16 F.linear 128x128", us=us([lambda w=w: F.linear(x128, w) for w in w128])))
    for R, C in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        x = torch.randn(1, C, device=dev, dtype=torch.float16)
        ws = [torch.randn(R, C, device=dev, dtype=torch.float16) for _ in range(8)]
        res.append(dict(case="fp16 F.linear", shape=[R, C], us=us([lambda w=w: F.linear(x, w) for w in ws])))
        del ws
        parts = synthetic_parts(R, C, 3.5, 0.0, seed=1, device=dev)
        mods = [MixedBitLinear.from_parts(parts, bias=None, dtype=torch.float16, device=dev) for _ in range(8)]
        nbytes = mods[0].qweight.numel() * 4
        srcs = [m.qweight for m in mods]
        dsts = [torch.empty_like(s) for s in srcs]
        res.append(dict(case="copy of the packed words", shape=[R, C], bytes=nbytes,
                        us=us([lambda s=s, d=d: d.copy_(s) for s, d in zip(srcs, dsts)])))
        del dsts
        for name, cfg in [("gemv_kernel GEMV1", dict(mixed_kernel.GEMV1)), ("mixed_gemv", dict(mixed_kernel.GEMV1_GLUON))]:
            for m in mods:
                m.tune = cfg
            res.append(dict(case=name, shape=[R, C], us=us([lambda m=m: m(x) for m in mods])))
            # every part empty: the same grid, offsets all zero
            m0 = mods[0]
            run = mixed_kernel.gemv_launcher(cfg)[0]
            units, uoff = m0.one_token_lists(cfg, dev)  # as the forward reads them
            empty = torch.zeros_like(uoff)  # offsets all zero, or (Gluon) part-table rows all zero

            def call(run=run, units=units, empty=empty, cfg=cfg):
                run(x, m0.kcols, m0.qweight, units, empty, m0.scale_bits, m0.zero, None, R, cfg, None, m0.wmask)

            res.append(dict(case=name + ", every part empty", shape=[R, C], us=us([call] * 8)))
        for r in res[-6:]:
            print(r, flush=True)
    for r in res[:3]:
        print(r)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv-floor.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
