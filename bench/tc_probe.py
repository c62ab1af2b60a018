"""Experiment (tensor-core decode, mixed_tc): the 7B layer's four one-token launches (q/k/v and gate/up grouped, o, down) with the current Gluon kernel and with TC=True, against the dense decode (relative error) and timed (CUDA graph over copies, median of 15). Extra args KEY=VALUE override the TC config (e.g. TS=2 maxnreg=128).

    python -m bench.tc_probe TS=2 maxnreg=128
"""
import sys, os, json, copy
sys.path.insert(0, ".")
import torch
import mixed_kernel, mixed_gemv, mixed_tc
from bench.inference import graph_time, copies_for
from bench.profile_launch import _linear, LAYERS

dev = torch.device("cuda:0")
G = mixed_kernel.GEMV1_GLUON
extra = dict(kv.split("=") for kv in sys.argv[1:])
TCCFG = dict(G, TC=True, **{k: int(v) for k, v in extra.items()})

def members(ms, cfg, tc):
    out = []
    for m in ms:
        units, uoff = m.part_table(cfg["SPLIT"], dev, cfg["XT"])
        qw = m._tcw if tc else m.qweight
        out.append((m.kcols, qw, units, uoff, m.scale_bits, m.zero, m.out_features))
    return out

def prep(m):
    m._tcw = mixed_tc.pack(m.codes_kernel_order(), m.blocks)
    assert m._tcw.shape == m.qweight.shape
    return m

def run(ms, x, cfg, tc):
    wm = 0
    for m in ms: wm |= m.wmask
    return mixed_gemv.gemv_gl_group(x, members(ms, cfg, tc), None, cfg, wm)

res = {}
for which in ("7b",):
    for bits in (3.5, 3.0):
        H, KV, F, _ = LAYERS[which]
        sets = {"qkv": [(H, H), (KV, H), (KV, H)], "o": [(H, H)], "gu": [(F, H), (F, H)], "down": [(H, F)]}
        tot = {"base": 0.0, "tc": 0.0}
        for name, shapes in sets.items():
            ms = [prep(_linear(r, c, bits, 7 * i + len(name), dev)) for i, (r, c) in enumerate(shapes)]
            x = torch.randn(1, shapes[0][1], device=dev, dtype=torch.float16)
            split = mixed_kernel.group_config(sum(r for r, _ in shapes), shapes[0][1], torch.float16)["SPLIT"] if len(ms) > 1 else (12 if shapes[0][0] * shapes[0][1] >= 1 << 25 else 16)
            cb, ct = dict(G, SPLIT=split), dict(TCCFG, SPLIT=split)
            ref = torch.cat([x.float() @ m.dequantize(torch.float32).T for m in ms], 1)
            yb = run(ms, x, cb, False).float()
            yt = run(ms, x, ct, True).float()
            eb = float((yb - ref).norm() / ref.norm()); et = float((yt - ref).norm() / ref.norm())
            n = copies_for(sum(m.packed_bytes() for m in ms))
            sets_c = [ms] + [[prep(copy.deepcopy(m)) if False else copy.deepcopy(m) for m in ms] for _ in range(n - 1)]
            tb = graph_time([lambda s=s: run(s, x, cb, False) for s in sets_c]) / n * 1e6
            tt = graph_time([lambda s=s: run(s, x, ct, True) for s in sets_c]) / n * 1e6
            tot["base"] += tb; tot["tc"] += tt
            row = dict(bits=bits, set=name, base_us=round(tb, 2), tc_us=round(tt, 2), err_base=eb, err_tc=et)
            print(row, flush=True)
            res[f"{which}-{bits}-{name}"] = row
        print(which, bits, "layer", {k: round(v, 1) for k, v in tot.items()}, flush=True)
if os.environ.get("OUT"):
    open(os.path.join(os.environ["OUT"], "tcprobe.json"), "w").write(json.dumps(res, indent=1))
