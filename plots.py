"""The PNG figures of `--plot DIR`.

Figures: bits.png, the average width per layer and linear with the distribution of widths
per layer; mi.png, the MI matrix of layer 0's first linears ordered by cluster, with the
width each linear gave each cluster. matplotlib (Agg backend) is imported only to draw.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np


# ---------------------------------------------------------------- figures
def bits_grid(reports: dict, layers_path: str = "model.layers") -> tuple[list[int], list[str], np.ndarray]:
    """Layers, linear names (in first-seen order) and avg bits (L, K), NaN where absent."""
    pat = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.(.+)$")
    cells, layers, names = {}, [], []
    for key, rep in reports.items():
        m = pat.match(key)
        if not m:
            continue
        i, name = int(m.group(1)), m.group(2)
        layers += [i] if i not in layers else []
        names += [name] if name not in names else []
        cells[i, name] = rep.avg_bits
    layers.sort()
    grid = np.full((len(layers), len(names)), np.nan)
    for (i, name), b in cells.items():
        grid[layers.index(i), names.index(name)] = b
    return layers, names, grid


def width_fractions(reports: dict, layers: list[int], layers_path: str = "model.layers"
                    ) -> tuple[list[int], np.ndarray]:
    """Widths present and, per layer, the fraction of its weights at each width (L, W)."""
    counts: dict[tuple[int, int], float] = {}
    for i in layers:
        prefix = f"{layers_path}.{i}."
        for key, rep in reports.items():
            if key.startswith(prefix):
                for g in rep.groups:
                    counts[i, g["bits"]] = counts.get((i, g["bits"]), 0) + rep.shape[0] * len(g["channels"])
    widths = sorted({b for _, b in counts})
    frac = np.array([[counts.get((i, b), 0.0) for b in widths] for i in layers], dtype=float)
    return widths, frac / np.maximum(frac.sum(1, keepdims=True), 1)


def plot_bits(reports: dict, path, layers_path: str = "model.layers") -> Path:
    """Heatmap of avg bits (layers x linears) beside stacked bars of the widths per layer."""
    plt = _pyplot()
    layers, names, grid = bits_grid(reports, layers_path)
    widths, frac = width_fractions(reports, layers, layers_path)
    height = max(3.0, 0.28 * len(layers) + 1.5)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(names)), [n.split(".")[-1] for n in names], rotation=45, ha="right")
    step = max(1, len(layers) // 24)
    ax.set_yticks(range(0, len(layers), step), [str(i) for i in layers[::step]])
    ax.set_xlabel("linear")
    ax.set_ylabel("layer")
    ax.set_title("average bits per weight")
    if len(layers) * len(names) <= 400:
        for r in range(len(layers)):
            for c in range(len(names)):
                if not math.isnan(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=7,
                            color=_ink(im, grid[r, c]))
    fig.colorbar(im, ax=ax, label="bits")
    left = np.zeros(len(layers))
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(widths), 2)))
    for k, b in enumerate(widths):
        bx.barh(range(len(layers)), frac[:, k], left=left, color=colors[k], label=f"{b} bits")
        left += frac[:, k]
    bx.set_yticks(range(0, len(layers), step), [str(i) for i in layers[::step]])
    bx.invert_yaxis()  # layer 0 on top, as in the heatmap
    bx.set_xlim(0, 1)
    bx.set_xlabel("fraction of the layer's weights")
    bx.set_title("distribution of widths")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def block_mean(M: np.ndarray, size: int) -> np.ndarray:
    """M (n, n) averaged over square blocks so it is at most size x size (for a readable image)."""
    n = M.shape[0]
    f = math.ceil(n / size)
    if f <= 1:
        return M
    pad = (-n) % f
    P = np.pad(M, ((0, pad), (0, pad)), constant_values=np.nan)
    return np.nanmean(P.reshape(P.shape[0] // f, f, P.shape[1] // f, f), axis=(1, 3))


def ordered_mi(mi, groups: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The MI matrix with channels cluster after cluster (NaN diagonal: self-information is no
    affinity), and the positions where a new cluster starts."""
    order = np.concatenate([np.asarray(g["channels"], dtype=np.int64) for g in groups])
    M = np.asarray(mi, dtype=np.float64)[np.ix_(order, order)]
    np.fill_diagonal(M, np.nan)
    return M, np.cumsum([len(g["channels"]) for g in groups])[:-1]


def plot_mi(mi, linears: dict, path, title: str = "", max_pixels: int = 512) -> Path:
    """The MI matrix (C, C) with channels ordered cluster by cluster, cluster boundaries drawn,
    and beneath it the width each linear sharing the input gave each cluster.
    linears: short name -> LinearReport.groups ([{"bits", "channels"}], the clusters in order)."""
    plt = _pyplot()
    M, bounds = ordered_mi(mi, next(iter(linears.values())))
    shown = block_mean(M, max_pixels)
    vmax = float(np.nanquantile(shown, 0.99)) if np.isfinite(shown).any() else 1.0
    f = len(M) / shown.shape[0]
    fig, (ax, sx) = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True,
                                 gridspec_kw={"height_ratios": [7, 0.5 + 0.25 * len(linears)]})
    cmap = plt.get_cmap("magma").with_extremes(bad="0.6")  # grey: the diagonal
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=vmax or 1.0, interpolation="nearest", aspect="auto",
                   extent=(0, len(M), len(M), 0))
    for b in bounds:
        ax.axhline(b, color="c", lw=0.6)
        ax.axvline(b, color="c", lw=0.6)
    ax.set_ylabel("input channel (ordered by cluster)")
    ax.set_title(title or "MI between input channels, by cluster")
    fig.colorbar(im, ax=[ax, sx], label="MI (nats), clipped at the 99th percentile", shrink=0.8)
    strip = np.array([[b for g in gs for b in [g["bits"]] * len(g["channels"])] for gs in linears.values()])
    sim = sx.imshow(strip, aspect="auto", cmap="viridis", interpolation="nearest",
                    extent=(0, len(M), len(linears), 0))
    sx.set_yticks(np.arange(len(linears)) + 0.5, list(linears))
    sx.set_xlabel(f"input channel (ordered by cluster){f'; {f:.0f}x{f:.0f} blocks averaged' if f > 1 else ''}")
    centers = np.concatenate([[0], bounds, [len(M)]])
    for r, gs in enumerate(linears.values()):
        for c, g in enumerate(gs):
            sx.text((centers[c] + centers[c + 1]) / 2, r + 0.5, str(g["bits"]), ha="center", va="center",
                    fontsize=7, color=_ink(sim, g["bits"]))
    return _save(fig, path)


def write_plots(folder, reports: dict, mi=None, layers_path: str = "model.layers",
                mi_linears: tuple[str, ...] = ()) -> list[Path]:
    """bits.png always; mi.png when an MI matrix (C, C) of layer 0 is given. mi_linears: the
    layer-relative names of the linears sharing the input of that matrix."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [plot_bits(reports, folder / "bits.png", layers_path)]
    if mi is not None and mi_linears:
        linears = {n.split(".")[-1]: reports[f"{layers_path}.0.{n}"].groups for n in mi_linears
                   if f"{layers_path}.0.{n}" in reports}
        if linears:
            written.append(plot_mi(mi.float().numpy(), linears, folder / "mi.png",
                                   f"layer 0 {'/'.join(linears)} input: MI by cluster"))
    return written


def _ink(im, value: float) -> str:
    """Black or white text, whichever reads on the cell's colour."""
    r, g, b, _ = im.cmap(im.norm(value))
    return "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
