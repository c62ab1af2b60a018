"""Two probes of the one-token path on a CUDA machine (what limits `mixed_kernel.gemv_kernel`):

    python -m bench.gemv_probe

(1) host cost per call, eager as `generate` runs it: MixedBitLinear (GEMV and fused kernel) against
    F.linear on a 576x576 linear (SmolLM2's size), the launch alone, and a cProfile of the forward;
(2) the unit chain: one 4096x4096 linear at one token (CUDA graph, median) with 10 runs of mixed
    widths (bench.inference's synthetic 3.5-bit linear), 1, 4 and 16 runs of 4 bits and 1 run of 3
    bits, at SPLIT 4, 8, 16: how much the number of runs and the widths cost beside the bytes.
Prints only; results are written up by hand with the command, machine and commit.
"""
import sys, time, cProfile, pstats, io, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import mixed_kernel
from mixed_linear import MixedBitLinear
from bench.inference import graph_time, synthetic_parts


def main() -> None:
    dev = torch.device("cuda:0")
    m = MixedBitLinear.from_parts(synthetic_parts(576, 576, 3.5, 0.0, seed=1, device=dev), bias=None, dtype=torch.float16, device=dev)
    w = torch.randn(576, 576, device=dev, dtype=torch.float16)
    x = torch.randn(1, 576, device=dev, dtype=torch.float16)
    def per_call(f, n=2000):
        for _ in range(50): f()
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): f()
        torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
    print(f"F.linear {per_call(lambda: F.linear(x, w)):.1f} us/call")
    print(f"MixedBitLinear gemv {per_call(lambda: m(x)):.1f} us/call")
    m.tune = dict(BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, USE_DOT=False, GATHER=True, unit_k=256, num_warps=1)
    print(f"MixedBitLinear fused {per_call(lambda: m(x)):.1f} us/call")
    m.tune = None
    units, uoff = m.split_units(8, dev)
    cfg = dict(mixed_kernel.GEMV1)
    print(f"gemv() alone {per_call(lambda: mixed_kernel.gemv(x, m.kcols, m.qweight, units, uoff, m.scale_bits, m.zero, None, 576, cfg)):.1f} us/call")
    print(f"pick_config {per_call(lambda: mixed_kernel.pick_config(1, 576, 576, torch.float16)):.1f} us/call")
    print(f"split_units {per_call(lambda: m.split_units(8, dev)):.1f} us/call")
    print(f"torch.cuda.device ctx {per_call(lambda: torch.cuda.device(dev).__enter__()):.1f} us/call")
    pr = cProfile.Profile(); pr.enable()
    for _ in range(500): m(x)
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14); print(s.getvalue()[:3500])

    # unit-chain probe: the same 4096x4096 linear with 10 runs of mixed widths, 1 run, 4 and 16 runs of one width
    def parts_runs(R, C, n_runs, b, seed=3):
        g = torch.Generator(device=dev).manual_seed(seed)
        cuts = [C * i // n_runs for i in range(n_runs + 1)]
        runs = [(cuts[i], cuts[i + 1], b) for i in range(n_runs)]
        return {"codes": torch.randint(0, 2 ** b, (R, C), generator=g, device=dev, dtype=torch.int32), "keep": None,
                "scale": (torch.rand(R, n_runs, generator=g, device=dev) * 2e-3 + 1e-4).half().float(),
                "zero": torch.randint(0, 2 ** b, (R, n_runs), generator=g, device=dev).float(),
                "perm": torch.randperm(C), "runs": runs, "avg_bits": float(b)}
    R = C = 4096
    xx = torch.randn(1, C, device=dev, dtype=torch.float16)
    ww = [torch.randn(R, C, device=dev, dtype=torch.float16) for _ in range(8)]
    print(f"fp16 4096x4096: {graph_time([lambda w=w: F.linear(xx, w) for w in ww]) / 8 * 1e6:.1f} us")
    for label, parts in [("10 runs, widths 2-5 (3.5)", synthetic_parts(R, C, 3.5, 0.0, seed=1, device=dev)),
                         ("1 run of 4 bits", parts_runs(R, C, 1, 4)), ("4 runs of 4 bits", parts_runs(R, C, 4, 4)),
                         ("16 runs of 4 bits", parts_runs(R, C, 16, 4)), ("1 run of 3 bits", parts_runs(R, C, 1, 3))]:
        mods = [MixedBitLinear.from_parts(parts, bias=None, dtype=torch.float16, device=dev) for _ in range(8)]
        for S in (4, 8, 16):
            for mm in mods:
                mm.tune = dict(mixed_kernel.GEMV1, SPLIT=S)
            t = graph_time([lambda mm=mm: mm(xx) for mm in mods]) / 8
            nb = mods[0].packed_bytes()
            print(f"{label}: SPLIT {S}: {t * 1e6:.1f} us, {nb / t / 1e9:.0f} GB/s, units {mods[0].split_units(S, dev)[0].shape[0]}")


if __name__ == "__main__":
    main()
