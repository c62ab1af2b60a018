"""Spreading one decoder layer's work over several devices.

Every visible GPU takes part (CUDA_VISIBLE_DEVICES chooses them). The calibration and
evaluation windows are split into one contiguous share per device; the layer is replicated
on each and each replica runs forward passes over its own share (data parallel), filling
its own Hessian, which are then summed on the first device. A solve with enough rows
(split_parts) is split by output rows (rows are independent given H): each device solves its
rows of every linear with a copy of H; smaller ones run on the first device. Spectral
clustering stays on the first device. With one device nothing here copies anything, so that
path is exactly the single-device code.

One thread drives every device: CUDA launches are asynchronous, so stepping each device's
work in turn (a batch of windows, a block of solver columns) keeps all of them busy as long
as no step waits for its device. (One thread per device was measured slower than one device
on a LLaMA-7B layer's forward passes, 0.18 s against 0.11 s on two H200s; stepping in turn
took 0.057 s.)
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch


def device_list(dev) -> list[torch.device]:
    """A device, a list of them, or a comma-separated string ('cuda:0,cuda:1') -> list."""
    if isinstance(dev, (list, tuple)):
        return [torch.device(d) for d in dev]
    if isinstance(dev, str):
        return [torch.device(d.strip()) for d in dev.split(",") if d.strip()]
    return [torch.device(dev)]


def split_counts(n: int, parts: int) -> list[int]:
    """n items in `parts` contiguous shares, the first ones one larger where n does not divide."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def scatter(x: torch.Tensor, devs: list[torch.device]) -> list[torch.Tensor]:
    """Split x along dim 0 into one contiguous share per device (each its own storage, so x
    can be freed). One device: x itself."""
    if len(devs) == 1:
        return [x.to(devs[0])]
    shares, r0 = [], 0
    for d, n in zip(devs, split_counts(x.shape[0], len(devs))):
        shares.append(x[r0:r0 + n].to(d, copy=True))
        r0 += n
    return shares


def gather(shares: list[torch.Tensor], dev) -> torch.Tensor:
    """Concatenate the shares on `dev` (one share already there: itself)."""
    if len(shares) == 1:
        return shares[0].to(dev)
    return torch.cat([s.to(dev) for s in shares], 0)


def to_device(obj, dev):
    """obj with every tensor inside (tuples, lists, dicts) moved to dev."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, tuple):
        return tuple(to_device(o, dev) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, dev) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    return obj


def replicate(module: torch.nn.Module, devs: list[torch.device]) -> list[torch.nn.Module]:
    """[module] + a copy on each further device (module must already be on devs[0])."""
    return [module] + [copy.deepcopy(module).to(d) for d in devs[1:]]


def on_device(dev: torch.device):
    """Context making dev the current CUDA device (kernels such as Triton's launch on the
    current device); nothing for the CPU."""
    return torch.cuda.device(dev) if dev.type == "cuda" else nullcontext()


def interleave(steps: list, devs: list[torch.device]) -> list:
    """Run generators (one per device) to the end, advancing each in turn by one step with
    its device current; returns their return values in order. A step should queue work on
    its device without waiting for it, so that the devices run at the same time. If one
    raises, the others are closed and the exception propagates."""
    results: list = [None] * len(steps)
    live = list(range(len(steps)))
    try:
        while live:
            for k in list(live):
                with on_device(devs[k]):
                    try:
                        next(steps[k])
                    except StopIteration as done:
                        results[k] = done.value
                        live.remove(k)
    finally:
        for k in live:
            steps[k].close()
    return results


def launched(fn, *args, **kwargs):
    """A one-step generator: calls fn (which should only queue device work and return device
    tensors), yields, then returns the result moved to the CPU (where the wait happens)."""
    out = fn(*args, **kwargs)
    yield
    return to_device(out, "cpu")


# Splitting one solve (or one allocation pass) by rows pays only where each device gets many
# rows: the solver's column chain is latency-bound (its fused block kernel fits a few thousand
# rows in one wave) and every device adds its own launches, all queued by one host thread.
# Measured on 2 x H200, 7B layer, 50% + MI 4.0 (bench/layer_profile.py, one timed run each): the
# solve took 0.65 s on one GPU and 1.19 s split over two (the largest set, gate/up, has 22016 rows).
# The 16384 itself is not measured: no 70B-shaped split was timed against the unsplit solve.
MIN_SPLIT_ROWS = 16384


def split_parts(rows: int, parts: int) -> int:
    """Over how many devices to split work on `rows` stacked rows: at least MIN_SPLIT_ROWS each."""
    return max(1, min(parts, rows // max(1, MIN_SPLIT_ROWS)))


def row_shares(rows: list[int], parts: int) -> list[list[slice]]:
    """Row slices of each of several stacked matrices for `parts` devices: share k holds the
    k-th contiguous share of every matrix. Fewer shares where a matrix has fewer rows."""
    parts = max(1, min([parts] + rows))
    cuts = [split_counts(r, parts) for r in rows]
    shares = []
    for k in range(parts):
        share = []
        for c in cuts:
            r0 = sum(c[:k])
            share.append(slice(r0, r0 + c[k]))
        shares.append(share)
    return shares
