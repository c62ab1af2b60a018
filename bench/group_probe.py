"""What one launch for linears that read the same input is worth (a CUDA machine): q/k/v (and
gate/up) of LLaMA-2-7B, 70B, LLaMA-3-8B and SmolLM2-135M shapes run one after another, against one linear of their summed
rows (bench.inference's synthetic linears at 3.5 and 3.0 stored bits), with pick_config's choice
and with the Gluon kernel at 12-32 parts. Each time is a CUDA graph over enough copies to stream
from HBM, median of 15 replays, us per set. The single linears (7B and 70B o and down) compare
pick_config's choice with the Gluon kernel at each part count. --step-costs times each part count once
per way of balancing the parts (`mixed_linear.block_parts`: none, by bits; a number, by time with that
cost of a tile's step); --configs once per change to GEMV1_GLUON's other settings (JSON).

    python -m bench.group_probe [--splits 12 16] [--step-costs none 4] [--configs '{"BLOCK_N": 128, "num_warps": 2}']
                                [--sets "7B o" "7B down"] [--tag=-x]
    # writes bench/results/group-probe-<gpu>-<date><tag>.{md,json}

The commit is GIT_COMMIT if set, else `git rev-parse HEAD`."""
import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, ".")
import torch  # noqa: E402

import mixed_kernel  # noqa: E402
from bench.inference import commit, copies_for, graph_time, synthetic_linear  # noqa: E402

SETS = {"7B q/k/v": [(4096, 4096)] * 3, "7B gate/up": [(11008, 4096)] * 2,
        "70B q/k/v": [(8192, 8192), (1024, 8192), (1024, 8192)], "70B gate/up": [(28672, 8192)] * 2,
        "LLaMA-3-8B q/k/v": [(4096, 4096), (1024, 4096), (1024, 4096)],
        "SmolLM2-135M q/k/v": [(576, 576), (192, 576), (192, 576)], "SmolLM2-135M gate/up": [(1536, 576)] * 2,
        # single linears: pick_config's choice against the Gluon kernel at each part count
        "7B o": [(4096, 4096)], "7B down": [(4096, 11008)], "70B o": [(8192, 8192)], "70B down": [(8192, 28672)]}
SPLITS = (12, 16, 24, 32)


def modules(shapes: list, target: float, seed: int, dev) -> list:
    return [synthetic_linear(r, c, target, seed + i, dev) for i, (r, c) in enumerate(shapes)]


def set_time(mods: list, x: torch.Tensor, tune: dict | None = None) -> float:
    """us of one pass over the set (its linears one after another)."""
    n = copies_for(sum(m.packed_bytes() for m in mods))
    sets = [mods] + [[copy.deepcopy(m) for m in mods] for _ in range(n - 1)]
    for s in sets:
        for m in s:
            m.tune = tune
    return graph_time([lambda m=m: m(x) for s in sets for m in s]) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", nargs="+", type=int, default=list(SPLITS), help="Gluon part counts to time")
    ap.add_argument("--step-costs", nargs="+", default=["none"],
                    help="ways to balance the parts: none (by bits) or a step cost (by time)")
    ap.add_argument("--configs", nargs="+", default=["{}"],
                    help="changes to the Gluon configuration, each a JSON object (default: none)")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), metavar="SET",
                    help="sets to time (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the results files' names")
    args = ap.parse_args()
    variants = [(sp, None if c == "none" else float(c), json.loads(e)) for e in args.configs for sp in args.splits
                for c in args.step_costs]
    names = [f"Gluon {sp} parts" + ("" if c is None else f", step cost {c:g}") + "".join(f", {k} {v}" for k, v in e.items())
             for sp, c, e in variants]
    dev = torch.device("cuda:0")
    rows = []
    for target in (3.5, 3.0):
        for name, shapes in ((n, SETS[n]) for n in args.sets):
            x = torch.randn(1, shapes[0][1], device=dev, dtype=torch.float16)
            summed = (sum(r for r, _ in shapes), shapes[0][1])
            row = {"bits": target, "set": name, "summed": "x".join(map(str, summed)),
                   "separate_us": set_time(modules(shapes, target, 0, dev), x),
                   "one_linear_us": set_time(modules([summed], target, 10, dev), x),
                   "pick": str(mixed_kernel.pick_config(1, *summed, torch.float16, device=dev))}
            for name_, (sp, c, e) in zip(names, variants):
                row[name_] = set_time(modules([summed], target, 10, dev), x,
                                      dict(mixed_kernel.GEMV1_GLUON, SPLIT=sp, STEP_COST=c, **e))
            rows.append(row)
            print(row, flush=True)
    gpu, date = torch.cuda.get_device_name(dev), datetime.date.today().isoformat()
    res = {"machine": gpu, "date": date, "command": "python -m bench.group_probe " + " ".join(sys.argv[1:]),
           "commit": commit(),
           "torch": torch.__version__, "rows": rows}
    out = Path(__file__).resolve().parent / "results" / f"group-probe-{gpu.replace(' ', '-')}-{date}{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    L = [f"# One launch per shared-input set: {gpu}, {date}", "", f"`{res['command']}`, commit {res['commit']}, "
         f"torch {res['torch']}. us per set (CUDA graph, median of 15).", "",
         "| bits | set | separate | one linear (rows summed), pick_config | " + " | ".join(names) + " |",
         "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        L.append(f"| {r['bits']} | {r['set']} | {r['separate_us']:.1f} | {r['one_linear_us']:.1f} ({r['summed']}) | "
                 + " | ".join(f"{r[n]:.1f}" for n in names) + " |")
    out.with_suffix(".md").write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
