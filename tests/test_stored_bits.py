"""Stored bits: the report counts exactly what the packed file holds for each linear, the
stored budget is met, the allocation is the exact optimum of its cost model, the clipping
search, and --n_groups auto."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import packing
from channel_grouping import allocate_stored, pruned_per_group
from compress import compress_model
from config import CompressConfig
from datautils import get_loaders
from model_io import ARCHS, load_model, load_tokenizer, save_model
from quant import MSE_NORM, fit_grid, fit_minmax, quantize

CASES = {
    "mi_stored_auto": dict(wbits=4, target_avg_bits=3.5, bits_budget="stored", n_groups=0),
    "mi_stored_k4_mse": dict(wbits=4, target_avg_bits=3.6, bits_budget="stored", n_groups=4, clip="mse"),
    "sparse50_mi_stored": dict(wbits=4, sparsity=0.5, target_avg_bits=3.0, bits_budget="stored", n_groups=0),
    "nm24_mi_stored": dict(wbits=4, prunen=2, prunem=4, target_avg_bits=3.0, bits_budget="stored", n_groups=4),
    # clusters cut into runs of 16 columns compete with whole clusters (the tiny model has 64 columns)
    "mi_stored_auto_runs": dict(wbits=4, target_avg_bits=4.5, bits_budget="stored", n_groups=0, n_groups_max=2,
                                auto_groupsize=16),
    "sparse50_mi_stored_runs": dict(wbits=4, sparsity=0.5, target_avg_bits=3.6, bits_budget="stored", n_groups=0,
                                    n_groups_max=2, auto_groupsize=16),
    "mi_weight_k4": dict(wbits=4, target_avg_bits=3.0, n_groups=4),
    "gptq_w3_g32_actorder_mse": dict(use_mi_grouping=False, wbits=3, groupsize=32, act_order=True, clip="mse"),
    "rtn_w4_g32": dict(use_mi_grouping=False, wbits=4, groupsize=32, rtn=True),
}


@pytest.fixture(scope="module")
def packed(tiny_models, text_files, tmp_path_factory):
    """case -> (reports, per-linear bytes in packed.safetensors, config)."""
    out = {}
    tok = load_tokenizer(str(tiny_models["qwen2"]), False)  # q/k/v biases, 4 query / 2 KV heads
    windows = get_loaders(str(text_files["calib"]), tok, 4, 0, 64)
    for case, fields in CASES.items():
        cfg = CompressConfig(**fields)
        model = load_model(str(tiny_models["qwen2"]), torch.float32, False)
        reports = compress_model(model, ARCHS["qwen2"], cfg, [] if cfg.rtn else windows, torch.device("cpu"),
                                 torch.float32).reports
        folder = tmp_path_factory.mktemp(case) / "out"
        save_model(model, tok, str(folder), {}, overwrite=False,
                   packed={"reports": reports, "nm": (cfg.prunen, cfg.prunem), "pruned": cfg.prunes})
        header, stored = packing.read_packed(folder)
        nbytes = {name: sum(t.numel() * t.element_size() for k, t in stored.items()
                            if k.startswith(name + ".") and k[len(name) + 1:] in packing.PACKED_PARTS)
                  for name in header["linears"]}
        out[case] = reports, nbytes, cfg, header
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_report_counts_what_the_file_holds(packed, case):
    reports, nbytes, cfg, header = packed[case]
    assert set(nbytes) == set(reports) and not header["dense_fallback"]
    for name, rep in reports.items():
        R, C = rep.shape
        assert rep.stored_bits == pytest.approx(8 * nbytes[name] / (R * C), abs=1e-12), name
    if cfg.bits_budget == "stored" and not cfg.prunen:  # N:M kept codes per group are only estimated
        assert max(r.stored_bits for r in reports.values()) <= cfg.target_avg_bits + 1e-9
    if cfg.sparsity:
        assert any(info["mask"] == "bitmask" for info in header["linears"].values())


def test_auto_groups_spends_the_stored_budget_better_than_fixed_groups(packed):
    auto = packed["mi_stored_auto"][0]
    assert len({len(r.groups) for r in auto.values()}) > 1, "auto chose different numbers of clusters"
    assert all(3.2 < r.stored_bits <= 3.5 + 1e-9 for r in auto.values())


def test_runs_inside_clusters_are_chosen_and_counted(packed):
    """With --auto_groupsize, some linear set picks clusters cut into runs (more runs than
    clusters, none longer than 16 columns), and the file holds exactly what its report counts
    (test_report_counts_what_the_file_holds runs on these cases too)."""
    cut = 0
    for case in ("mi_stored_auto_runs", "sparse50_mi_stored_runs"):
        for rep in packed[case][0].values():
            runs = rep.qparams["runs"]
            assert sorted(int(r[0]) for r in runs) == [int(r[0]) for r in runs]
            if len(runs) > len(rep.groups):
                cut += 1
                assert max(int(e) - int(s) for s, e, _ in runs) <= 16
                # every run lies inside one group and takes its width
                c, spans = 0, []
                for g in rep.groups:
                    spans.append((c, c + len(g["channels"]), g["bits"]))
                    c += len(g["channels"])
                for s, e, b in runs:
                    assert any(gs <= s and e <= ge and b == gb for gs, ge, gb in spans)
    assert cut > 0, "no linear chose runs inside its clusters"


# ---------------------------------------------------------------- allocation
def exact_bytes(rows: int, sizes: list[int], widths: list[int], pruned: list[int] | None,
                groupsize: int = -1) -> int:
    """Bytes the packed file holds for a linear with these groups (permuted), each cut into
    runs of groupsize columns (the rest last), dense or with a mask for the pruned weights
    (pruned: per run), whichever packing picks."""
    C = sum(sizes)
    runs, c = [], 0
    for s, b in zip(sizes, widths):
        for start in range(c, c + s, groupsize if groupsize > 0 else s):
            runs.append((start, min(start + groupsize, c + s) if groupsize > 0 else c + s, b))
        c += s
    dense = packing.linear_nbytes(rows, C, runs, [rows * (e - s) for s, e, _ in runs], "dense", (0, 0), True)["total"]
    if not pruned or sum(p * b for p, (_, _, b) in zip(pruned, runs)) * rows <= rows * C:
        return dense
    kept = [rows * (e - s - p) for (s, e, _), p in zip(runs, pruned)]
    return packing.linear_nbytes(rows, C, runs, kept, "bitmask", (0, 0), True)["total"]


@pytest.mark.parametrize("seed,sparsity,groupsize", [(0, 0.0, -1), (1, 0.0, -1), (2, 0.5, -1), (3, 0.5, -1),
                                                     (4, 0.3, -1), (5, 0.0, 8), (6, 0.5, 8), (7, 0.3, 12)])
def test_stored_allocation_is_the_best_that_fits(seed, sparsity, groupsize):
    from quant import run_sizes
    rng = np.random.default_rng(seed)
    sizes = [int(x) for x in rng.integers(5, 40, 4)]
    rows, target, candidates = 24, 3.7, [2, 3, 4, 5, 6]
    if groupsize > 0:
        target = 5.6  # the grids of more runs (runs of 8 columns: 2.4 bits of scale and zero per weight)
    err = np.sort(rng.random((4, len(candidates))) * 10, axis=1)[:, ::-1]  # wider: less error
    runs = [n for s in sizes for n in run_sizes(s, groupsize)]
    assert len(runs) > 4 or groupsize < 0
    pruned = pruned_per_group(runs, sparsity) if sparsity else None
    widths, total = allocate_stored(err, sizes, candidates, target, rows, pruned, groupsize=groupsize)
    budget = target * rows * sum(sizes)
    assert 8 * exact_bytes(rows, sizes, widths, pruned, groupsize) <= budget
    feasible = [(sum(err[g, candidates.index(b)] for g, b in enumerate(ws)), ws)
                for ws in itertools.product(candidates, repeat=4)
                if 8 * exact_bytes(rows, sizes, list(ws), pruned, groupsize) <= budget - 7 * (2 * len(runs) + 2)]
    best = min(feasible)[0]
    assert total == pytest.approx(sum(err[g, candidates.index(b)] for g, b in enumerate(widths)))
    assert total <= best + 1e-9  # at least as good as anything that fits with room for byte padding


def test_pruned_per_group_matches_the_solver():
    from sparsegpt_mi import LinearSolver
    torch.manual_seed(0)
    X, W = torch.randn(256, 48), torch.randn(10, 48)
    solver = LinearSolver(48, torch.device("cpu"))
    solver.add_batch(X)
    groups = [torch.arange(0, 13), torch.arange(13, 30), torch.arange(30, 48)]
    res = solver.solve([W], groups, [[16, 16, 16]], sparsity=0.45, blocksize=8)[0]
    Wp = res.weight[:, res.perm]
    c = 0
    for g, p in zip(groups, pruned_per_group([13, 17, 18], 0.45)):
        assert ((Wp[:, c:c + g.numel()] == 0).sum(1) == p).all()
        c += g.numel()


# ---------------------------------------------------------------- clipping search
def test_mse_grid_never_worse_and_on_fp16():
    torch.manual_seed(0)
    W = torch.randn(64, 96) * torch.rand(64, 1)
    W[::7, 3] *= 12  # outliers: clipping pays there
    for bits in (2, 3, 4):
        maxq = torch.full((64,), 2.0 ** bits - 1)
        errs = []
        for mse in (False, True):
            scale, zero = fit_grid(W, maxq, mse=mse)
            assert torch.equal(scale, scale.half().float()), "scales are what the file stores"
            errs.append((quantize(W, scale[:, None], zero[:, None], maxq[:, None]) - W).abs().pow(MSE_NORM).sum(1))
        assert (errs[1] <= errs[0] + 1e-6).all() and (errs[1] < 0.9 * errs[0]).any()
    s0, z0 = fit_minmax(W, torch.full((64,), 15.0))
    assert torch.equal(quantize(torch.zeros(64, 1), s0[:, None], z0[:, None], torch.full((64, 1), 15.0)),
                       torch.zeros(64, 1)), "0 stays on the grid"


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("rows,cols,widths", [(300, 58, None), (1, 40, None), (5, 3, None), (90, 70, [2, 3, 4, 8])])
def test_mse_search_all_fractions_at_once_equals_one_after_another(sym, rows, cols, widths, monkeypatch):
    """quant._mse_search (every range fraction at once, in row pieces) picks, bit for bit, the grid
    that trying the fractions one after another with a strict improvement picks."""
    import quant
    from quant import MSE_SHRINK, _grid, _row_range
    g = torch.Generator().manual_seed(rows * cols)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    W[0] = 0  # a flat row: every fraction ties
    if widths is None:
        maxq = 2.0 ** torch.randint(2, 9, (rows,), generator=g).float() - 1
    else:
        maxq = (2.0 ** torch.tensor(widths, dtype=torch.float32) - 1)[:, None]
    xmin, xmax = _row_range(W, sym)

    def error(s, z):
        return (quantize(W, s[..., None], z[..., None], maxq[..., None]) - W).abs().pow(MSE_NORM).sum(-1)
    scale, zero = _grid(xmin, xmax, maxq, sym)
    best = error(scale, zero)
    for shrink in MSE_SHRINK[1:]:
        s, z = _grid(xmin, xmax, maxq, sym, shrink)
        err = error(s, z)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, err, best)
    for max_elems in (1 << 22, 700):  # one piece, and pieces of a few rows
        s, z = quant._mse_search(W, xmin, xmax, maxq, sym, max_elems)
        assert torch.equal(s, scale) and torch.equal(z, zero)
    assert torch.equal(fit_grid(W, maxq, sym, mse=True)[0], scale)


def test_mse_clipping_lowers_the_solvers_error():
    from sparsegpt_mi import LinearSolver
    torch.manual_seed(1)
    X = torch.randn(512, 64) * torch.linspace(0.2, 2, 64)
    W = torch.randn(32, 64)
    W[:, 5] *= 8
    loss = {}
    for mse in (False, True):
        solver = LinearSolver(64, torch.device("cpu"))
        solver.add_batch(X)
        res = solver.solve([W], [torch.arange(64)], [[3]], groupsize=16, mse=mse)[0]
        loss[mse] = float(((X @ (res.weight - W).t()) ** 2).sum())
    assert loss[True] < loss[False]


def test_quality_rows_name_their_grid():
    """bench/quality.py's rows keep the grid and the choice of clusters they were measured with
    whatever CompressConfig's defaults: "_mse" rows and the stored-budget rows search the
    clipping range (except the one named "_minmax"); every other row uses min-max grids; "_trials"
    rows choose by trial solves among whole clusters and 128-column runs, "_trials_g0" by trial
    solves among whole clusters, "_proxy_g128" by the proxy among both, every other row by the proxy
    among whole clusters."""
    from bench.quality import ROWS
    choice = {"_trials": ("solve", 128), "_trials_g0": ("solve", 0), "_proxy_g128": ("proxy", 128)}
    for name, row in ROWS.items():
        mse = name.endswith("_mse") or ("stored" in name and not name.endswith("_minmax"))
        cfg = CompressConfig(**row)
        assert cfg.clip == ("mse" if mse else "minmax"), name
        want = next((v for k, v in choice.items() if name.endswith(k)), ("proxy", 0))
        assert (cfg.auto_select, cfg.auto_groupsize) == want, name


def test_quality_merge_keeps_each_rows_commit_and_takes_medians(tmp_path):
    """bench/quality.py --merge: seeds run as separate processes become one file whose medians
    are over all of them, each run keeping the commit it was measured at; runs of another
    protocol are refused."""
    import json
    from pathlib import Path
    from bench.quality import merge_files, write_results
    head = dict(machine="GPU X", model="m.gguf", calibration="c4.txt", eval="wiki.txt", eval2="pydoc",
                protocol={"nsamples": 128, "seqlen": 2048, "eval_windows": 128}, versions={}, devices="cuda:0")

    def run(commit, seed, ppl, date="2026-11-30"):
        row = dict(row="r", seed=seed, wiki_ppl=ppl, eval2_ppl=ppl / 2, avg_bits=3.0, effective_bits=3.1,
                   stored_bits=3.15, sparsity=0.0, seconds=1.0)
        path = tmp_path / f"{commit}-{seed}.json"
        path.write_text(json.dumps({**head, "date": date, "commit": commit, "command": f"run {seed}", "rows": [row]}))
        return str(path)
    files = [run("bbb", 2, 30.0), run("aaa", 0, 10.0), run("aaa", 1, 50.0, "2026-11-29")]
    meta, rows = merge_files(files)
    assert [r["commit"] for r in rows] == ["bbb", "aaa", "aaa"]
    assert meta["commit"] == "aaa, bbb" and meta["date"] == "2026-11-30" and len(meta["sources"]) == 3
    stem = write_results(meta, rows, str(tmp_path / "out"), "-merged")
    med = json.loads(stem.with_suffix(".json").read_text())["medians"][0]
    assert med["wiki_ppl"] == 30.0 and med["wiki_ppl_all"] == [10.0, 50.0, 30.0]  # in seed order
    assert "| r | 2 | 30.00 | 15.00 | 3.150 | 3.000 | 1.0 | bbb |" in stem.with_suffix(".md").read_text()
    other = json.loads(Path(files[0]).read_text())
    other["eval"] = "other.txt"
    Path(files[0]).write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="eval differ"):
        merge_files(files)


# ---------------------------------------------------------------- --n_groups auto: trial solves
def test_shortlist_keeps_the_proxy_best_its_neighbours_and_one_cluster_cut_into_runs():
    from compress import shortlist
    # (proxy error, k, groupsize): whole clusters best at k=6; runs best at k=4
    options = [(9.0, 1, -1), (5.0, 2, -1), (3.0, 4, -1), (1.0, 6, -1), (2.0, 8, -1), (4.0, 12, -1),
               (7.0, 1, 128), (6.0, 2, 128), (0.5, 4, 128), (3.5, 6, 128)]
    assert shortlist(options) == [2, 3, 4, 6, 7, 8, 9]
    assert shortlist([(1.0, 1, -1)]) == [0]


def test_auto_select_solve_never_loses_to_the_proxys_pick():
    """--auto_select solve picks, among the proxy's best plans, the one the solver itself finds
    best: with all rows in the trial (fewer than TRIAL_ROWS), its solve's calibration loss is at
    most that of the plan the proxy alone picks, and both meet the stored budget."""
    from dataclasses import replace

    from compress import TRIAL_ROWS, choose_groups_and_bits, solve_set, stored_bits
    from sparsegpt_mi import LinearSolver
    g = torch.Generator().manual_seed(3)
    C = 96
    mix = torch.randn(C, C, generator=g) / C ** 0.5 + torch.eye(C)
    X = (torch.randn(2048, C, generator=g) @ mix) * torch.linspace(0.1, 3, C) ** 2  # unequal, correlated channels
    weights = [torch.randn(48, C, generator=g), torch.randn(24, C, generator=g)]
    weights[0][:, 7] *= 6
    assert max(W.shape[0] for W in weights) <= TRIAL_ROWS
    cfg = CompressConfig(wbits=4, target_avg_bits=3.4, bits_budget="stored", n_groups=0, n_groups_max=8,
                         auto_groupsize=32)
    loss, picked = {}, {}
    for sel in ("solve", "proxy"):
        c = replace(cfg, auto_select=sel)
        solver = LinearSolver(C, torch.device("cpu"))
        solver.add_batch(X)
        plan = choose_groups_and_bits(c, solver, weights, None, torch.device("cpu"))
        res = solve_set(c, solver, [W.clone() for W in weights], plan, [torch.device("cpu")])
        loss[sel] = sum(r.loss for r in res)
        picked[sel] = (len(plan.groups), plan.groupsize)
        for r in res:
            qp = {"perm": r.perm, "runs": r.runs, "scale": r.scale, "zero": r.zero}
            assert stored_bits(r.weight, qp, c) <= cfg.target_avg_bits + 1e-9
    assert loss["solve"] <= loss["proxy"] * (1 + 1e-9), (loss, picked)
