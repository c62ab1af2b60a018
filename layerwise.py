"""Streaming a model through its decoder layers, one layer at a time on the device(s).

Both compression and evaluation work the same way: the embeddings run once to capture the
hidden states entering layer 0 for every window (with every keyword argument the model
passes its layers), then each decoder layer in turn goes to the device(s), runs over all
windows, and goes back to the CPU; its outputs are the next layer's inputs. So a model far
larger than the GPU is handled, as long as one layer and the activations fit.

    team = Team.spread(inps, kwargs, devs, fwd_batch)
    for i, layer in stream_layers(model, spec, team):
        team.forward(in_place=True)             # the activations become layer i's outputs
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from config import UsageError
from model_io import ArchSpec, get_module
from parallel import device_list, gather, interleave, replicate, scatter, split_counts, to_device
from quant import exact_matmul


class StopForward(Exception):
    """Raised from a hook once it has what it needs, to skip the rest of a forward pass."""


@torch.no_grad()
def capture_layer_inputs(model, spec: ArchSpec, windows, dev, dtype) -> tuple[torch.Tensor, dict]:
    """Run embeddings (and rotary) on `dev` and capture the hidden states entering layer 0
    for every window (1, seqlen), together with every keyword argument the model passes
    its decoder layers. Returns inps (N, seqlen, hidden) and the kwargs."""
    layers = get_module(model, spec.layers)
    parts = [get_module(model, spec.embed)] + ([get_module(model, spec.rotary)] if spec.rotary else [])
    for m in parts:
        m.to(dev)
    seqlen = windows[0].shape[-1]
    inps = torch.empty(len(windows), seqlen, model.config.hidden_size, device=dev, dtype=dtype)
    state = {"i": 0, "kwargs": None}

    def hook(_module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        inps[state["i"]] = hs[0]
        if state["kwargs"] is None:
            state["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, w in enumerate(windows):
            state["i"] = i
            try:
                get_module(model, spec.layers.rsplit(".", 1)[0])(input_ids=w.to(dev), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        for m in parts:
            m.to("cpu")
    return inps, state["kwargs"]


def layer_steps(layer, inps, outs, kwargs: dict, batch: int):
    """outs[i] = layer(inps[i]) for every window, `batch` windows per call, as a generator
    that yields after each call (parallel.interleave). outs may be inps itself (each batch is
    read before its outputs are written), which halves the activation memory. With outs None
    the outputs are dropped (a hook raising StopForward may cut each call short)."""
    for b0 in range(0, inps.shape[0], batch):
        try:
            out = layer(inps[b0:b0 + batch], **kwargs)
        except StopForward:
            out = None
        if outs is not None and out is not None:
            outs[b0:b0 + batch] = out[0] if isinstance(out, (tuple, list)) else out
        yield


def run_layer(layer, inps, outs, kwargs: dict, batch: int) -> None:
    """layer_steps run to the end on one device."""
    for _ in layer_steps(layer, inps, outs, kwargs, batch):
        pass


@dataclass
class Team:
    """The devices one layer is spread over: device k holds shares[k] of the windows'
    activations, the layer's keyword arguments there (kwargs[k]) and, while a layer is being
    worked on, its replica layers[k] (layers[0] is the model's own module, on devs[0])."""
    devs: list[torch.device]
    shares: list[torch.Tensor]   # (n_k, seqlen, hidden) each
    kwargs: list[dict]
    fwd_batch: int = 4
    layers: list[torch.nn.Module] = field(default_factory=list)

    @classmethod
    def spread(cls, inps: torch.Tensor, kwargs: dict, dev, fwd_batch: int = 4) -> "Team":
        """Split the windows into one contiguous share per device (inps can be freed)."""
        devs = device_list(dev)
        return cls(devs, scatter(inps, devs), [kwargs] + [to_device(kwargs, d) for d in devs[1:]], fwd_batch)

    @property
    def lead(self) -> torch.device:
        return self.devs[0]

    @property
    def windows(self) -> int:
        return sum(x.shape[0] for x in self.shares)

    def forward(self, in_place: bool) -> None:
        """Replica k over device k's share of the windows (in place, or outputs dropped), the
        devices' batches queued in turn so that they compute at the same time."""
        if len(self.devs) == 1:
            x = self.shares[0]
            run_layer(self.layers[0], x, x if in_place else None, self.kwargs[0], self.fwd_batch)
            return
        interleave([layer_steps(layer, x, x if in_place else None, kw, self.fwd_batch)
                    for layer, x, kw in zip(self.layers, self.shares, self.kwargs)], self.devs)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(x).all()) for x in self.shares)

    def gather(self, dev) -> torch.Tensor:
        return gather(self.shares, dev)


def stream_layers(model, spec: ArchSpec, team: Team, start: int = 0):
    """Each decoder layer from `start` on, moved to the team's first device and replicated on
    the others (team.layers) while the caller works on it, then moved back to the CPU.
    Yields (index, layer)."""
    for i, layer in enumerate(get_module(model, spec.layers)):
        if i < start:
            continue
        layer.to(team.lead)
        team.layers = replicate(layer, team.devs)
        try:
            yield i, layer
        finally:
            team.layers = []
            layer.to("cpu")


@torch.no_grad()
def perplexity(model, spec: ArchSpec, tokens, seqlen: int, dev, dtype, max_windows: int = 0,
               fwd_batch: int = 4) -> float:
    """exp(mean over non-overlapping windows of the mean token cross-entropy), streamed layer
    by layer so that a model larger than the GPU evaluates. dev: one device or a list; the
    windows are split over them as in compression."""
    devs = device_list(dev)
    n = tokens.shape[1] // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    devs = devs[:n]
    windows = [tokens[:, i * seqlen:(i + 1) * seqlen] for i in range(n)]
    with exact_matmul():
        inps, kwargs = capture_layer_inputs(model, spec, windows, devs[0], dtype)
        team = Team.spread(inps, kwargs, devs, fwd_batch)
        del inps
        for _ in stream_layers(model, spec, team):
            team.forward(in_place=True)  # one activation buffer
        values = _window_losses(model, spec, team, windows)
    return math.exp(sum(values) / len(values))


def _window_losses(model, spec: ArchSpec, team: Team, windows: list) -> list[float]:
    """Mean token cross-entropy of every window, from the last layer's outputs (window order)."""
    devs = team.devs
    top = torch.nn.ModuleList([get_module(model, spec.norm), get_module(model, spec.head)]).to(devs[0])
    first = [0]
    for c in split_counts(len(windows), len(devs))[:-1]:
        first.append(first[-1] + c)

    def nlls(d, top_d, x, w0):  # one window per step; the values stay on the device until the end
        out = []
        for i in range(x.shape[0]):
            logits = top_d[1](top_d[0](x[i:i + 1])).float()  # (1, T, V)
            target = windows[w0 + i].to(d)
            out.append(torch.nn.functional.cross_entropy(logits[0, :-1], target[0, 1:]))
            yield
        return [float(v) for v in out]
    per_device = interleave([nlls(d, t, x, w0) for d, t, x, w0 in zip(devs, replicate(top, devs), team.shares, first)],
                            devs)
    top.to("cpu")
    return [v for part in per_device for v in part]
