"""The compression driver: every decoder layer, linear set by linear set in true-sequential
order, through four phases:

1. statistics  the layer runs over the calibration windows; a hook on the set's input
               accumulates the Hessian (and, for the binned MI estimator, a token sample)
2. plan        channel groups (MI clustering or an ablation) and a width per group and linear
3. solve       joint pruning + quantization with error compensation (sparsegpt_mi.py)
4. write back  the compressed weights go into the layer (and its replicas) and a report

    result = compress_model(model, spec, cfg, windows, devs, dtype, emit=print_event)
    result.reports["model.layers.0.self_attn.q_proj"].avg_bits

What the driver has to say goes out as event records (dicts with "event", see events.py)
through `emit`; it prints nothing itself.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from config import TRIAL_ROWS, CompressConfig, LinearReport
from layerwise import StopForward, Team, capture_layer_inputs, offload_activations, stream_layers
from model_io import ArchSpec, get_module
from parallel import device_list, interleave, launched, row_shares, split_parts
from quant import exact_matmul, group_overhead_bits, magnitude_prune, rtn_quantize, run_sizes


def _quiet(_record: dict) -> None:
    pass


# ---------------------------------------------------------------- stage timer
class StageTimer:
    """Seconds per named stage (`with timer("solve"): ...`). When enabled it synchronizes the
    devices at each stage boundary so the numbers are true; disabled it costs nothing."""

    def __init__(self, dev=None, enabled: bool = False):
        self.devs, self.enabled = (device_list(dev) if dev is not None else []), enabled
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        return _Stage(self, stage)


class _Stage:
    def __init__(self, timer: StageTimer, stage: str):
        self.t, self.stage = timer, stage

    def _sync(self):
        if self.t.enabled:
            for d in self.t.devs:
                if d.type == "cuda":
                    torch.cuda.synchronize(d)

    def __enter__(self):
        self._sync()
        self.tick = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        if self.t.enabled:
            self.t.seconds[self.stage] = self.t.seconds.get(self.stage, 0.0) + time.perf_counter() - self.tick


NO_TIMER = StageTimer()


# ---------------------------------------------------------------- results
@dataclass
class Plan:
    """Phase 2 for one linear set: channel groups (index tensors, in solver order), widths
    bits[linear][group], the MI statistics (None without MI) and the MI matrix (kept only
    when asked for, on the CPU)."""
    groups: list[torch.Tensor]
    bits: list[list[int]]
    mi_stats: dict | None
    mi: torch.Tensor | None
    seconds: float
    groupsize: int = -1  # MI mode: a group longer than this is cut into runs of it, each with its own grid


def solve_options(cfg: CompressConfig, plan: Plan) -> dict:
    """LinearSolver.solve_steps' keyword arguments for this plan: the configuration's, with the
    plan's runs inside groups in MI mode."""
    options = cfg.solver_options()
    if cfg.mixed:
        options["groupsize"] = plan.groupsize
    return options


@dataclass
class Compression:
    """What compress_layer / compress_model return: a report per linear (keyed by module path
    relative to the layer, or to the model) and the first MI matrix when it was asked for."""
    reports: dict[str, LinearReport]
    mi: torch.Tensor | None = None


# ---------------------------------------------------------------- phase 1: statistics
def gather_statistics(team: Team, names: tuple[str, ...], cfg: CompressConfig, timer: StageTimer = NO_TIMER):
    """Hessian (and token sample) of the input of linear set `names`: every device runs its
    replica over its share of the windows into its own solver; the shares are summed into
    the first device's. Returns (solver, sample or None)."""
    return gather_set_statistics(team, [names], cfg, timer)[0]


def gather_set_statistics(team: Team, sets: list[tuple[str, ...]], cfg: CompressConfig,
                          timer: StageTimer = NO_TIMER) -> list[tuple]:
    """gather_statistics for several linear sets of the layer in one forward pass (the pass
    stops at the last set's input): [(solver, sample or None)] in the order of `sets`."""
    from mutual_info import TokenSample
    from sparsegpt_mi import LinearSolver
    nwin = team.windows
    binned = cfg.mixed and cfg.grouping.startswith("mi") and cfg.mi_method == "binned"
    # per set, one solver (Hessian) and, for the binned estimator, one token sample per device;
    # the samples split the token budget by the devices' shares of the windows
    solvers = [[LinearSolver(get_module(team.layers[0], names[0]).in_features, d) for d in team.devs] for names in sets]
    samples = [[TokenSample(max(1, cfg.mi_tokens * x.shape[0] // max(nwin, 1)),
                            max(1, cfg.mi_tokens // max(1, nwin)), cfg.seed + k) if binned else None
                for k, x in enumerate(team.shares)] for _ in sets]

    def hook_for(solver, sample, last):
        def hook(_m, inp, _out):
            solver.add_batch(inp[0].detach())
            if sample is not None:
                sample.add_batch(inp[0].detach())
            if last:
                raise StopForward
        return hook

    handles = [get_module(rep, names[0]).register_forward_hook(hook_for(solvers[j][k], samples[j][k],
                                                                        j == len(sets) - 1))
               for j, names in enumerate(sets) for k, rep in enumerate(team.layers)]
    try:
        with timer("forward+hessian"):
            team.forward(in_place=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for per_dev, per_dev_samples in zip(solvers, samples):
        solver, sample = per_dev[0], per_dev_samples[0]
        for other, other_sample in zip(per_dev[1:], per_dev_samples[1:]):  # the devices' shares on the first
            solver.absorb(other)
            other.free()
            if sample is not None:
                sample.absorb(other_sample)
        out.append((solver, sample))
    return out


# ---------------------------------------------------------------- phase 2: groups and widths
AUTO_GROUPS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # what --n_groups auto tries (up to --n_groups_max)


def candidate_ks(cfg: CompressConfig, columns: int) -> list[int]:
    """The numbers of clusters to try: --n_groups, or for auto every AUTO_GROUPS value up to
    --n_groups_max (and the number of channels)."""
    if not cfg.auto_groups:
        return [min(cfg.n_groups, columns)]
    return sorted({min(k, columns) for k in AUTO_GROUPS if k <= cfg.n_groups_max})


def candidate_groupsizes(cfg: CompressConfig) -> list[int]:
    """Runs inside clusters to try: whole clusters (-1), and with auto and a stored budget also
    clusters cut into runs of --auto_groupsize columns (more grids, paid from the same budget)."""
    if cfg.auto_groups and cfg.bits_budget == "stored" and cfg.auto_groupsize > 0:
        return [-1, cfg.auto_groupsize]
    return [-1]


def shortlist(options: list[tuple]) -> list[int]:
    """The options (proxy error, k, groupsize, plan) worth a trial solve: for each groupsize, the
    number of clusters of least proxy error and its neighbours in k, and the fewest clusters
    (one cluster cut into runs: uniform act-order GPTQ at the width the budget allows).
    Measured on Qwen2.5-0.5B and SmolLM2 layers, the proxy (round-to-nearest error, no
    compensation) ranks neighbouring k about right but misjudges runs against clusters."""
    picked = set()
    for G in sorted({o[2] for o in options}):
        idx = sorted((i for i, o in enumerate(options) if o[2] == G), key=lambda i: options[i][1])
        best = min(range(len(idx)), key=lambda j: options[idx[j]][0])
        picked.update(idx[max(0, best - 1):best + 2])
        if G > 0:
            picked.add(idx[0])
    return sorted(picked)


def trial_loss(cfg: CompressConfig, solver, weights: list, plan: Plan, dev, rows: list[torch.Tensor]) -> float:
    """The solver's calibration loss (sum over rows of tr(E H E^T) / 2 after compensation) for
    this plan, from a solve of the given rows of each linear on a copy of H, scaled to all rows."""
    twin = solver.copy_to(dev)
    res = twin.solve([W[r.to(W.device)] for W, r in zip(weights, rows)], plan.groups, plan.bits,
                     **solve_options(cfg, plan))
    twin.free()
    return sum(x.loss * W.shape[0] / len(r) for x, W, r in zip(res, weights, rows))


def choose_groups_and_bits(cfg: CompressConfig, solver, weights: list, mi_sample, dev,
                           timer: StageTimer = NO_TIMER, keep_mi: bool = False) -> Plan:
    """Channel groups and per-linear widths for one shared-input set of linears: for each
    candidate number of clusters (and with auto and a stored budget, each run length inside
    clusters), the widths of least Hessian-weighted error within the budget (the proxy); the
    plan of least summed proxy error wins, or with --auto_select solve the shortlisted plan
    whose trial solve has the least calibration loss. dev: a device, or a list of them: the
    clustering and trial solves run on the first, the allocation errors are split by rows over
    all. keep_mi: return a CPU copy of the MI matrix (for --plot)."""
    from channel_grouping import (AFFINITY_METHODS, group_channels, groups_for_ks, order_groups,
                                  pruned_per_group)
    from mutual_info import abs_correlation, estimate_mi, mi_summary
    devs = device_list(dev)
    dev = devs[0]
    columns = solver.columns
    tick = time.perf_counter()
    if not cfg.mixed:
        bits = 16 if (cfg.wbits >= 16) else cfg.wbits
        return Plan([torch.arange(columns, device=dev)], [[bits] for _ in weights], None, None, 0.0)
    H = solver.hessian()
    diag = torch.diag(H)
    ks = candidate_ks(cfg, columns)
    stats = kept = dependence = None
    if cfg.grouping in ("mi", "mi_hessian"):
        with timer("mi"):
            dependence = estimate_mi(cfg.mi_method, H, solver.mean(), mi_sample)
            stats = mi_summary(dependence)
            if keep_mi:
                kept = dependence.to("cpu", copy=True)  # before the in-place clustering
    elif cfg.grouping in ("corr", "corr_hessian"):
        with timer("mi"):
            dependence = abs_correlation(H, solver.mean())
    with timer("clustering"):
        if cfg.auto_groups:
            by_k = groups_for_ks(cfg.grouping, ks, mi=dependence, diag=diag, seed=cfg.seed, columns=columns,
                                 inplace=True)
        elif cfg.grouping in AFFINITY_METHODS:
            by_k = {ks[0]: group_channels(cfg.grouping, ks[0], mi=dependence, diag=diag, seed=cfg.seed,
                                          inplace=True)}
        else:
            by_k = {ks[0]: group_channels(cfg.grouping, ks[0], diag=diag, seed=cfg.seed, columns=columns)}
        del dependence
    candidates = list(range(cfg.min_bits, cfg.max_bits + 1))
    options = []  # (proxy error, k, groupsize, plan) of every plan that fits the budget
    with timer("allocation"):
        by_k = {k: order_groups(groups, diag) for k, groups in by_k.items()}  # once per k, for every run length
        for G in candidate_groupsizes(cfg):
            for k, groups in by_k.items():
                sizes = [int(g.numel()) for g in groups]
                if G > 0 and max(sizes) <= G:
                    continue  # no cluster is cut: the plan without runs
                errs = _cluster_errors(cfg, H, weights, groups, candidates, devs, G)
                runs = [n for size in sizes for n in run_sizes(size, G)]
                pruned = pruned_per_group(runs, cfg.sparsity) if cfg.sparsity and cfg.mask_scope == "row" else None
                choice = _allocate(cfg, errs, sizes, candidates, [W.shape[0] for W in weights], pruned, G)
                if choice is not None:
                    options.append((choice[1], k, G, Plan(groups, choice[0], stats, kept, 0.0, G)))
        if not options:  # no number of clusters fits a stored budget: the cheapest widths, with a warning
            groups = by_k[min(by_k)]
            options.append((float("inf"), min(by_k), -1,
                            Plan(groups, [[cfg.min_bits] * len(groups) for _ in weights], stats, kept, 0.0)))
    pick = min(range(len(options)), key=lambda i: options[i][0])
    if cfg.auto_groups and cfg.auto_select == "solve" and len(options) > 1:
        with timer("trial solves"):
            gen = torch.Generator().manual_seed(cfg.seed)
            rows = [torch.sort(torch.randperm(W.shape[0], generator=gen)[:TRIAL_ROWS]).values for W in weights]
            losses = {i: trial_loss(cfg, solver, weights, options[i][3], dev, rows) for i in shortlist(options)}
            pick = min(losses, key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
    plan = options[pick][3]
    for d in devs:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    plan.seconds = time.perf_counter() - tick
    return plan


def _cluster_errors(cfg: CompressConfig, H, weights: list, groups: list, candidates: list[int], devs: list,
                    groupsize: int = -1):
    """err[linear, group, width] (see channel_grouping.cluster_errors): one pass over the
    stacked linears that share H, their rows split over the devices where there are enough
    (parallel.split_parts). The proxy uses min-max
    grids even with --clip mse (the search per group, width and number of clusters would cost
    more than the solve; the solver's grids are searched)."""
    from channel_grouping import cluster_errors
    dev = devs[0]
    rows = [W.shape[0] for W in weights]
    shares = row_shares(rows, split_parts(sum(rows), len(devs)))
    used = devs[:len(shares)]

    def errors(d, share):
        Hd = H if d == dev else H.to(d)
        gd = groups if d == dev else [g.to(d) for g in groups]
        return cluster_errors(torch.cat([W[rows].to(d) for W, rows in zip(weights, share)], 0), Hd, gd,
                              candidates, cfg.target_sparsity, cfg.sym,
                              row_splits=[r.stop - r.start for r in share], on_device=True, groupsize=groupsize)
    parts = interleave([launched(errors, d, share) for d, share in zip(used, shares)], used)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _allocate(cfg: CompressConfig, errs, sizes: list[int], candidates: list[int], rows: list[int], pruned,
              groupsize: int = -1):
    """(widths per linear, summed error) within the budget, or None where a stored budget
    cannot be met with these groups."""
    from channel_grouping import allocate_bits, allocate_stored
    if cfg.bits_budget == "weight":
        bits = [allocate_bits(err, sizes, candidates, cfg.target_avg_bits) for err in errs]
        return bits, sum(float(err[g, candidates.index(b)]) for err, bb in zip(errs, bits) for g, b in enumerate(bb))
    out, total = [], 0.0
    for err, r in zip(errs, rows):
        choice = allocate_stored(err, sizes, candidates, cfg.target_avg_bits, r, pruned, (cfg.prunen, cfg.prunem),
                                 groupsize)
        if choice is None:
            return None
        out.append(choice[0])
        total += choice[1]
    return out, total


# ---------------------------------------------------------------- phase 3: solve
def solve_set(cfg: CompressConfig, solver, weights: list, plan: Plan, devs: list, timer: StageTimer = NO_TIMER):
    """Prune and quantize the stacked weights of one set against its Hessian. Output rows are
    independent given H: where the set has enough rows (parallel.split_parts), each device
    solves a share of them (one device where the mask threshold couples all rows). Returns one
    SolveResult per weight."""
    from sparsegpt_mi import merge_row_shares
    with timer("solve"):
        coupled = cfg.mask_scope == "block" and cfg.sparsity > 0 and not cfg.prunen  # one threshold over all rows
        rows = [W.shape[0] for W in weights]
        shares_rows = row_shares(rows, 1 if coupled else split_parts(sum(rows), len(devs)))
        used = devs[:len(shares_rows)]
        twins = [solver] + [solver.copy_to(d) for d in used[1:]]  # before any solve consumes H
        options = solve_options(cfg, plan)
        if len(used) == 1:
            results = solver.solve(weights, plan.groups, plan.bits, **options)
        else:  # the devices' column blocks queued in turn
            parts = interleave([sv.solve_steps([W[r] for W, r in zip(weights, rows)], plan.groups, plan.bits,
                                               **options) for sv, rows in zip(twins, shares_rows)], used)
            results = merge_row_shares(parts, devs[0])
        for sv in twins:
            sv.free()
    return results


# ---------------------------------------------------------------- phase 4: write back
def write_back(team: Team, index: int, names: tuple[str, ...], results: list, plan: Plan, cfg: CompressConfig,
               emit=_quiet) -> dict[str, LinearReport]:
    """Put the compressed weights into the layer and its replicas (the next set's forward
    passes run on them) and report each linear."""
    reports = {}
    sizes = [int(g.numel()) for g in plan.groups]
    for name, res, b in zip(names, results, plan.bits):
        lin = get_module(team.layers[0], name)
        columns = lin.in_features
        if not torch.isfinite(res.weight).all():
            raise FloatingPointError(f"layer {index} {name}: the solver produced NaN/inf weights; "
                                     "try a larger --percdamp or more --nsamples")
        lin.weight.data = res.weight.to(team.lead, lin.weight.dtype)
        for replica in team.layers[1:]:
            other = get_module(replica, name).weight
            other.data = lin.weight.data.to(other.device)
        eff = res.avg_bits + group_overhead_bits(b, sizes, solve_options(cfg, plan)["groupsize"]) if res.avg_bits < 16 else 16.0
        if cfg.mixed:
            eff += math.ceil(math.log2(max(columns, 2))) / lin.out_features  # the stored permutation
        qparams = None if res.avg_bits >= 16 else {"perm": res.perm, "runs": res.runs, "scale": res.scale,
                                                   "zero": res.zero}
        rep = LinearReport(shape=[lin.out_features, columns], sparsity=res.sparsity, avg_bits=res.avg_bits,
                           effective_bits=eff, loss=res.loss, seconds=res.seconds + plan.seconds / len(names),
                           groups=[{"bits": int(bb), "channels": g.tolist()} for bb, g in zip(b, plan.groups)],
                           stored_bits=stored_bits(res.weight, qparams, cfg), qparams=qparams)
        reports[name] = rep
        budgeted = rep.stored_bits if cfg.bits_budget == "stored" else res.avg_bits
        if cfg.mixed and budgeted < cfg.target_avg_bits - 0.01 - 1e-9:
            emit({"event": "under_target", "layer": index, "linear": name, "bits": budgeted,
                  "target": cfg.target_avg_bits})
        if cfg.mixed and budgeted > cfg.target_avg_bits + 1e-9:
            emit({"event": "warning", "text": f"layer {index} {name}: {budgeted:.3f} {cfg.bits_budget} bits, over the "
                                              f"target {cfg.target_avg_bits} (no grouping fits it; raise the target)"})
        emit({"event": "linear", "layer": index, "linear": name, "loss": res.loss, "sparsity": res.sparsity,
              "bits": res.avg_bits, "stored_bits": rep.stored_bits, "groups": len(plan.groups),
              "seconds": rep.seconds})
    return reports


def stored_bits(W: torch.Tensor, qparams: dict | None, cfg: CompressConfig) -> float:
    """Bits per weight the packed file will hold for this linear (16: stored dense)."""
    import packing
    if qparams is None:
        return 16.0
    return 8 * packing.stored_bytes(W, qparams, (cfg.prunen, cfg.prunem))["total"] / W.numel()


def round_to_nearest(team: Team, index: int, names: tuple[str, ...], cfg: CompressConfig,
                     emit=_quiet) -> dict[str, LinearReport]:
    """The --rtn baseline for one set: magnitude pruning and round-to-nearest, no calibration."""
    reports = {}
    for name in names:
        lin = get_module(team.layers[0], name)
        columns = lin.in_features
        tick = time.perf_counter()
        W = lin.weight.data.float()
        if cfg.prunes:
            W = magnitude_prune(W, cfg.sparsity, cfg.prunen, cfg.prunem)
        qparams = None
        Q = W
        if cfg.wbits < 16:
            Q, scale, zero = rtn_quantize(W, cfg.wbits, cfg.groupsize, cfg.sym, cfg.clip == "mse")
            g = columns if cfg.groupsize <= 0 else cfg.groupsize
            qparams = {"perm": torch.arange(columns), "scale": scale.cpu(), "zero": zero.cpu(),
                       "runs": [(c0, min(c0 + g, columns), cfg.wbits) for c0 in range(0, columns, g)]}
        Q = Q * (W != 0)
        lin.weight.data = Q.to(lin.weight.dtype)
        rep = LinearReport(shape=list(W.shape), sparsity=float((W == 0).float().mean()), avg_bits=float(cfg.wbits),
                           effective_bits=cfg.wbits + group_overhead_bits([cfg.wbits], [columns], cfg.groupsize),
                           loss=float("nan"), seconds=time.perf_counter() - tick,
                           groups=[{"bits": cfg.wbits, "channels": list(range(columns))}],
                           stored_bits=stored_bits(Q, qparams, cfg), qparams=qparams)
        reports[name] = rep
        emit({"event": "linear", "layer": index, "linear": name, "loss": None, "sparsity": rep.sparsity,
              "bits": rep.avg_bits, "stored_bits": rep.stored_bits, "groups": 1, "seconds": rep.seconds})
    return reports


# ---------------------------------------------------------------- one layer, the whole model
def _check_weights(index: int, names: tuple[str, ...], layer) -> None:
    for name in names:
        if not torch.isfinite(get_module(layer, name).weight).all():
            raise FloatingPointError(f"layer {index} {name}: the model's own weights hold NaN/inf before "
                                     "compression; the checkpoint is damaged or overflowed its dtype (try "
                                     "--dtype float32 or bfloat16, or a fresh copy of the model)")


def _plan_set(team: Team, index: int, names: tuple[str, ...], cfg: CompressConfig, solver, weights: list,
              sample, emit, timer: StageTimer, keep_mi: bool, result: Compression) -> Plan:
    """Phase 2 for one set, its MI event emitted and (keep_mi) the layer's first MI matrix kept in result."""
    plan = choose_groups_and_bits(cfg, solver, weights, sample, team.devs, timer, keep_mi and result.mi is None)
    if plan.mi is not None and result.mi is None:
        result.mi = plan.mi
    if plan.mi_stats is not None:
        emit({"event": "mi", "layer": index, "linears": [n.split(".")[-1] for n in names],
              **{f"mi_{k}": v for k, v in plan.mi_stats.items()}, "groups": len(plan.groups),
              "seconds": plan.seconds})
    return plan


@torch.no_grad()
def compress_layer(team: Team, index: int, spec: ArchSpec, cfg: CompressConfig, emit=_quiet,
                   timer: StageTimer = NO_TIMER, keep_mi: bool = False) -> Compression:
    """Compress the linears of the team's current layer (team.layers) in true-sequential
    order (or, with cfg.true_sequential off, all sets from one forward pass: compress_sets_at_once).
    keep_mi: return the layer's first MI matrix (on the CPU)."""
    if not cfg.true_sequential and not cfg.rtn:
        return compress_sets_at_once(team, index, spec, cfg, emit, timer, keep_mi)
    result = Compression({})
    for names in spec.groups:
        _check_weights(index, names, team.layers[0])
        if cfg.rtn:
            result.reports.update(round_to_nearest(team, index, names, cfg, emit))
            continue
        solver, sample = gather_statistics(team, names, cfg, timer)
        weights = [get_module(team.layers[0], n).weight.data for n in names]
        plan = _plan_set(team, index, names, cfg, solver, weights, sample, emit, timer, keep_mi, result)
        results = solve_set(cfg, solver, weights, plan, team.devs, timer)
        result.reports.update(write_back(team, index, names, results, plan, cfg, emit))
    return result


def set_cost(rows: int, columns: int) -> float:
    """A solve's relative duration: its chain of column blocks (columns) times the width of
    each step (rows + columns: the block's rows and the lazy update's columns)."""
    return float(columns) * (rows + columns)


def assign_sets(costs: list[float], parts: int) -> list[int]:
    """The device of each set: the costliest first, each onto the least loaded device."""
    load, where = [0.0] * parts, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
        k = min(range(parts), key=lambda d: load[d])
        where[j] = k
        load[k] += costs[j]
    return where


def _device_solves(items: list, cfg: CompressConfig):
    """One device's solves one after another, as one generator (parallel.interleave steps
    several devices' in turn): items are (solver, weights, plan); returns their results."""
    results = []
    for solver, weights, plan in items:
        results.append((yield from solver.solve_steps(weights, plan.groups, plan.bits, **solve_options(cfg, plan))))
        solver.free()
    return results


@torch.no_grad()
def compress_sets_at_once(team: Team, index: int, spec: ArchSpec, cfg: CompressConfig, emit=_quiet,
                          timer: StageTimer = NO_TIMER, keep_mi: bool = False) -> Compression:
    """--true_sequential 0: the Hessians of every linear set from one forward pass over the
    layer as it was (as GPTQ's and SparseGPT's reference scripts do without their true-sequential
    option), so the sets no longer wait for each other: their plans are made one after another
    on the first device, then their solves run at the same time, each whole set on one device
    (assign_sets balances them). Results differ from the true-sequential order (the later sets
    do not see the earlier sets' errors). Holds every set's Hessian at once (at 7B: three of
    4096^2 and one of 11008^2 fp32, 0.64 GiB; at 70B 3.8 GiB)."""
    result = Compression({})
    sets = list(spec.groups)
    for names in sets:
        _check_weights(index, names, team.layers[0])
    stats = gather_set_statistics(team, sets, cfg, timer)
    plans, todo = [], []
    for names, (solver, sample) in zip(sets, stats):
        weights = [get_module(team.layers[0], n).weight.data for n in names]
        plan = _plan_set(team, index, names, cfg, solver, weights, sample, emit, timer, keep_mi, result)
        plans.append(plan)
        todo.append((solver, weights))
    where = assign_sets([set_cost(sum(W.shape[0] for W in ws), sv.columns) for sv, ws in todo], len(team.devs))
    per_dev: list[list] = [[] for _ in team.devs]
    order: list[list[int]] = [[] for _ in team.devs]
    for j, ((solver, weights), plan) in enumerate(zip(todo, plans)):
        d = team.devs[where[j]]
        if solver.device != d:
            moved = solver.copy_to(d)
            solver.free()
            solver, weights = moved, [W.to(d) for W in weights]
        per_dev[where[j]].append((solver, weights, plan))
        order[where[j]].append(j)
    used = [k for k in range(len(team.devs)) if per_dev[k]]
    with timer("solve"):
        done = interleave([_device_solves(per_dev[k], cfg) for k in used],
                          [team.devs[k] for k in used])
    results: list = [None] * len(sets)
    for k, res in zip(used, done):
        for j, r in zip(order[k], res):
            results[j] = r
    for names, res, plan in zip(sets, results, plans):
        result.reports.update(write_back(team, index, names, res, plan, cfg, emit))
    return result


def memory_use(devs: list) -> dict[str, float]:
    """For the progress of a layer: host memory now and at its peak (GiB, where the OS tells),
    and the peak GPU memory allocated so far on the first CUDA device of the run."""
    from streaming import host_memory_gib
    out = host_memory_gib()
    cuda = [d for d in devs if torch.device(d).type == "cuda"]
    if cuda:
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(cuda[0]) / 2 ** 30
    return out


@torch.no_grad()
def compress_model(model, spec: ArchSpec, cfg: CompressConfig, windows, dev, dtype, emit=_quiet,
                   fwd_batch: int = 4, timer: StageTimer = NO_TIMER, keep_mi: bool = False,
                   checkpoint=None, store=None, max_gpu_memory: float | None = None,
                   restore_outer: bool = True, overlap_io: bool | None = None,
                   keep_qparams: bool = True) -> Compression:
    """Layer-by-layer compression of the whole model; returns a report per linear (keyed by
    module path) and, with keep_mi, layer 0's first MI matrix. checkpoint (checkpoint.py):
    each finished layer is written there; on resume the layers it holds are restored instead
    of compressed and the next layer starts from the saved activations. store
    (streaming.LayerStore): where the layers are read from and where each compressed layer
    goes (default: the model's own layers, in host memory). max_gpu_memory: GiB per device;
    where the activations would not fit beside the work they stay in pinned host memory.
    restore_outer False: a streamed model's embeddings and head stay parked (meta) afterwards, for a
    caller that saves them from the checkpoint (SaveWriter.finish's outer) and restores them only
    to evaluate (LayerStore.restore_outer).
    overlap_io: a streamed store reads the next layer onto the device and writes the finished
    one to the save folder on a worker thread while the device computes (store.background; the
    device then holds up to two layers beside the one being compressed; the copies run beside
    the device's work, host_copy.py). None: on where the first device is a GPU and no
    max_gpu_memory cap is set (on an H200 the CLI's 70B-shaped layers took a median 10.1 s
    without it and 7.1 s with it). The files written are the same.

    keep_qparams False: the returned reports lose their qparams (each linear's grid: the scales
    and zeros, ~7 MiB per 7B layer) once the store and checkpoint have had them, so that host
    memory does not grow with the number of layers; the figures stay.

    Nothing here draws from the global RNGs: clustering, the binned-MI token sample and the
    random grouping each seed their own generator with cfg.seed per call, so a resumed run
    computes exactly what an uninterrupted one does.

    dev: one device or a list (see parallel.py): the windows are split over the devices and
    each layer is replicated on all of them while it is compressed."""
    from streaming import LayerStore
    store = store or LayerStore(model, spec, dtype)
    devs = device_list(dev)
    if overlap_io is None:
        overlap_io = devs[0].type == "cuda" and max_gpu_memory is None
    store.background = bool(overlap_io) and store.streamed
    offload = False
    with exact_matmul():
        if cfg.rtn:
            devs = devs[:1]  # nothing to spread: no calibration forward passes
            inps, kwargs = torch.empty(0, 1, device=devs[0]), {}
        else:
            offload = offload_activations(model.config, len(windows), windows[0].shape[-1], dtype, devs,
                                          max_gpu_memory)
            # kwargs are needed on resume too
            inps, kwargs = capture_layer_inputs(model, spec, windows, devs[0], dtype, host=offload)
        first, result = 0, Compression({})
        if checkpoint is not None:
            first, result = checkpoint.restore(store, None if cfg.rtn else inps, emit)
            if not keep_qparams:
                result.reports = {n: r.without_grid() for n, r in result.reports.items()}
        team = Team.spread(inps, kwargs, devs, fwd_batch, offload)
        del inps
        store.park_outer()  # embeddings and head: not needed again until evaluation and save
        layers = stream_layers(store, team, first)
        try:
            start = time.perf_counter()
            while True:
                with timer("layer in"):  # the next layer read (or waited for) and replicated, the last one unloaded
                    nxt = next(layers, None)
                if nxt is None:
                    break
                i, layer = nxt
                tick = time.perf_counter()
                done = compress_layer(team, i, spec, cfg, emit, timer, keep_mi and result.mi is None)
                result.reports.update({f"{spec.layers}.{i}.{n}": r if keep_qparams else r.without_grid()
                                       for n, r in done.reports.items()})
                result.mi = result.mi if result.mi is not None else done.mi
                if not cfg.rtn:
                    with timer("forward outputs"):  # in place: the next layer's inputs
                        team.forward(in_place=True)
                    if not team.finite():
                        raise FloatingPointError(f"layer {i}: NaN/inf in the compressed layer's outputs; "
                                                 "try a larger --percdamp, more --nsamples or --dtype bfloat16")
                if checkpoint is not None:
                    with timer("checkpoint"):
                        checkpoint.save_layer(i, layer, done.reports, None if cfg.rtn else team.shares,
                                              {"mi": done.mi} if i == 0 and done.mi is not None else None)
                with timer("layer out"):  # to the output (or kept), before the layer is unloaded
                    store.finish(i, layer, done.reports)
                elapsed = time.perf_counter() - start
                emit({"event": "layer", "layer": i, "seconds": time.perf_counter() - tick, "done": i + 1,
                      "total": len(store), "eta": elapsed / (i + 1 - first) * (len(store) - i - 1),
                      **memory_use(devs)})
        finally:
            layers.close()  # the layer in hand (and one read ahead) unloaded now, also after an error
            try:
                with timer("layer out"):
                    store.wait_written()  # every layer in its file (or the writer's error raised) before the caller goes on
            finally:
                if restore_outer:
                    store.restore_outer()
    return result
