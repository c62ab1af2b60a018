"""Plot perplexity against effective bits (weights + scales/zeros + permutation) from
quality results files, one line per method, and print the markdown table README shows.

    python -m bench.plot_quality bench/results/quality-*.json --out bench/results/quality.png
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = {  # label: row-name pattern (the row's target/width varies along the line)
    "RTN per row": r"^rtn_w\d$",
    "RTN g128": r"^rtn_w\d_g128$",
    "GPTQ per row": r"^gptq_w\d$",
    "GPTQ g128": r"^gptq_w\d_g128$",
    "MI (Gaussian), 4 groups": r"^mi_t[\d.]+_k4$",
    "MI (Gaussian), 10 groups": r"^mi_t[\d.]+_k10$",
    "MI (Gaussian), 16 groups": r"^mi_t[\d.]+_k16$",
    "MI x Hessian, 4 groups": r"^mi_hessian_t[\d.]+_k4$",
}
POINTS = ("gptq_w3_g128_actorder", "mi_hessian_t3.0_k10", "ablation_random_t3.0_k10",
          "ablation_contiguous_t3.0_k10", "ablation_hessian_t3.0_k10", "ablation_binned_t3.0_k10")


def load(files: list[str]) -> dict[str, list[dict]]:
    """Rows by name, one per seed across files (a later file's run of the same row and seed
    replaces an earlier one)."""
    rows = defaultdict(dict)
    for f in files:
        for r in json.load(open(f))["rows"]:
            rows[r["row"]][r.get("seed", 0)] = r
    return {name: list(by_seed.values()) for name, by_seed in rows.items()}


def summary(rs: list[dict]) -> tuple[float, float, list[float]]:
    ppls = [r["wiki_ppl"] for r in rs]
    return statistics.median(ppls), rs[0]["effective_bits"], ppls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default="bench/results/quality.png")
    args = p.parse_args()
    rows = load(args.files)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, pat in SERIES.items():
        pts = sorted(summary(rs)[1::-1] for name, rs in rows.items() if re.match(pat, name))
        pts = [(b, ppl) for b, ppl in pts if b < 5]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for name in POINTS:
        if name in rows:
            ppl, bits, _ = summary(rows[name])
            ax.scatter([bits], [ppl], marker="x", s=50, zorder=3)
            ax.annotate(name.replace("_t3.0_k10", ""), (bits, ppl), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    fp16 = summary(rows["fp16"])[0] if "fp16" in rows else None
    if fp16:
        ax.axhline(fp16, color="grey", ls=":", label=f"FP16 ({fp16:.2f})")
    ax.set_yscale("log")
    ax.set_ylim(15, 1000)
    ax.set_xlabel("effective bits per weight (codes + fp16 scale + zero + permutation)")
    ax.set_ylabel("wiki.txt perplexity (128 x 2048)")
    ax.set_title("SmolLM2-135M, calibration c4.txt 128 x 2048, H100")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    print("| row | wiki ppl (median over seeds) | seeds | weight bits | effective bits |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        ppl, bits, all_ppl = summary(rs)
        seeds = ", ".join(f"{x:.2f}" for x in all_ppl) if len(all_ppl) > 1 else "1"
        print(f"| {name} | {ppl:.2f} | {seeds} | {rs[0]['avg_bits']:.3f} | {bits:.3f} |")


if __name__ == "__main__":
    main()
