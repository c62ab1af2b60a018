"""Spreading one decoder layer's work over several devices.

Every visible GPU takes part (CUDA_VISIBLE_DEVICES chooses them). The calibration and
evaluation windows are split into one contiguous share per device; the layer is replicated
on each and each replica runs forward passes over its own share (data parallel), filling
its own Hessian, which are then summed on the first device. The solves are split by output
rows (rows are independent given H): each device solves its rows of every linear with a
copy of H. Spectral clustering stays on the first device. With one device nothing here
starts a thread or copies anything, so that path is exactly the single-device code.

Work runs in one thread per device: PyTorch releases the GIL inside its kernels and CUDA
launches are asynchronous, so the devices compute at the same time.
"""
from __future__ import annotations

import copy
import threading

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


def parallel_map(fn, devs: list[torch.device], *per_device):
    """[fn(dev, *args_k) for each device k], the calls running at the same time, one thread
    per device with that device current. The first exception raised in any call is
    re-raised here once all calls have ended. One device: a plain call."""
    if len(devs) == 1:
        return [fn(devs[0], *(a[0] for a in per_device))]
    results: list = [None] * len(devs)
    errors: list = [None] * len(devs)

    def work(k: int):
        try:
            if devs[k].type == "cuda":
                with torch.cuda.device(devs[k]):
                    results[k] = fn(devs[k], *(a[k] for a in per_device))
                    torch.cuda.synchronize(devs[k])
            else:
                results[k] = fn(devs[k], *(a[k] for a in per_device))
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors[k] = e

    grad = torch.is_grad_enabled()

    def run(k: int):
        with torch.set_grad_enabled(grad):  # grad mode is per thread
            work(k)

    threads = [threading.Thread(target=run, args=(k,), name=f"device-{devs[k]}") for k in range(len(devs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


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
