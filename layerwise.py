"""Streaming a model through its decoder layers, one layer at a time on the device(s).

Both compression and evaluation work the same way: the embeddings run once to capture the
hidden states entering layer 0 for every window (with every keyword argument the model
passes its layers), then each decoder layer in turn goes to the device(s), runs over all
windows, and goes back (to the CPU, or for a streamed model to disk: streaming.LayerStore);
its outputs are the next layer's inputs. So a model far larger than the GPU is handled, as
long as one layer fits. The activations stay on the device, or, where they would not fit
under a memory cap (`offload_activations`), in pinned host memory, each batch of windows
going to the device for its forward pass and its outputs coming back.

    team = Team.spread(inps, kwargs, devs, fwd_batch)
    for i, layer in stream_layers(LayerStore(model, spec), team):
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


def host_buffer(shape: tuple, dtype, dev) -> torch.Tensor:
    """An empty CPU tensor, pinned where dev is a GPU (asynchronous copies need page-locked memory)."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.device(dev).type == "cuda")


def offload_activations(model_cfg, windows: int, seqlen: int, dtype, devs: list, cap_gib: float | None,
                        solve: bool = True) -> bool:
    """Whether the activations must live in host memory to stay under cap_gib per device: the
    device would hold its share of them, one layer, a forward batch's intermediates and, when
    compressing (solve), the solver's largest set of C x C fp32 buffers (Hessian, Cholesky
    factor and inverse, cusolver's copy, and during --auto_select solve's trial solves the
    Hessian's copy: five of the widest input). No cap: never."""
    if cap_gib is None:
        return False
    hidden, inter = model_cfg.hidden_size, getattr(model_cfg, "intermediate_size", 4 * model_cfg.hidden_size)
    size = torch.empty(0, dtype=dtype).element_size()
    share = -(-windows // len(devs)) * seqlen * hidden * size
    heads = model_cfg.num_attention_heads
    kv = getattr(model_cfg, "num_key_value_heads", heads) or heads
    layer = (2 * hidden * hidden + 2 * hidden * hidden * kv // heads + 3 * hidden * inter) * size
    forward = 4 * 4 * seqlen * max(hidden, inter) * size  # fwd_batch 4: a few MLP intermediates
    work = 5 * max(hidden, inter) ** 2 * 4 if solve else 0
    return share + layer + forward + work > cap_gib * 2 ** 30


@torch.no_grad()
def capture_layer_inputs(model, spec: ArchSpec, windows, dev, dtype, host: bool = False
                         ) -> tuple[torch.Tensor, dict]:
    """Run embeddings (and rotary) on `dev` and capture the hidden states entering layer 0
    for every window (1, seqlen), together with every keyword argument the model passes
    its decoder layers. Returns inps (N, seqlen, hidden) and the kwargs. host: inps in
    (pinned) host memory instead of on dev."""
    layers = get_module(model, spec.layers)
    parts = [get_module(model, spec.embed)] + ([get_module(model, spec.rotary)] if spec.rotary else [])
    for m in parts:
        m.to(dev)
    seqlen = windows[0].shape[-1]
    shape = (len(windows), seqlen, model.config.hidden_size)
    inps = host_buffer(shape, dtype, dev) if host else torch.empty(shape, device=dev, dtype=dtype)
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


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """A bool on x's device (nothing waits for it): x holds a NaN or an infinity. From x's least
    and greatest values (aminmax propagates NaN; an infinity is its own extreme): no buffer of
    x's size, where isfinite takes one byte per element plus an |x| copy (1 GiB and more for a
    7B run's activations, held after every layer on top of the layer's work)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x.reshape(-1))
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def all_finite(x: torch.Tensor) -> bool:
    """isfinite(x).all(), without its activation-sized buffers (nonfinite)."""
    return not bool(nonfinite(x))


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


def staged_steps(layer, host: torch.Tensor, dev, in_place: bool, kwargs: dict, batch: int, bad: list):
    """layer_steps for activations in host memory: each batch is copied to dev, run, and (in
    place) its outputs copied back over its inputs, the copies asynchronous from pinned memory
    and ordered on dev's stream. The batches and the operations are those of layer_steps, so
    the results are bitwise the same. bad[0] becomes a device flag: some output was NaN/inf."""
    for b0 in range(0, host.shape[0], batch):
        x = host[b0:b0 + batch].to(dev, non_blocking=True)
        try:
            out = layer(x, **kwargs)
        except StopForward:
            out = None
        if in_place and out is not None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            flag = nonfinite(out)
            bad[0] = flag if bad[0] is None else bad[0] | flag
            host[b0:b0 + batch].copy_(out, non_blocking=True)
        yield
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)  # the host copy is complete before anyone reads it


def run_layer(layer, inps, outs, kwargs: dict, batch: int) -> None:
    """layer_steps run to the end on one device."""
    for _ in layer_steps(layer, inps, outs, kwargs, batch):
        pass


@dataclass
class Team:
    """The devices one layer is spread over: device k holds shares[k] of the windows'
    activations (or host memory holds them for it: offloaded), the layer's keyword arguments
    there (kwargs[k]) and, while a layer is being worked on, its replica layers[k] (layers[0]
    is the model's own module, on devs[0])."""
    devs: list[torch.device]
    shares: list[torch.Tensor]   # (n_k, seqlen, hidden) each, on devs[k] or (offloaded) on the CPU
    kwargs: list[dict]
    fwd_batch: int = 4
    layers: list[torch.nn.Module] = field(default_factory=list)
    bad: list = field(default_factory=list)  # offloaded: per device, a flag set by NaN/inf outputs

    @classmethod
    def spread(cls, inps: torch.Tensor, kwargs: dict, dev, fwd_batch: int = 4, offload: bool = False) -> "Team":
        """Split the windows into one contiguous share per device (inps can be freed). offload:
        the shares stay in host memory (inps must be there: capture_layer_inputs(host=True))."""
        devs = device_list(dev)
        if offload:  # views of the one host buffer, a contiguous share per device
            shares = list(inps.split(split_counts(inps.shape[0], len(devs))))
        else:
            shares = scatter(inps, devs)
        return cls(devs, shares, [kwargs] + [to_device(kwargs, d) for d in devs[1:]], fwd_batch)

    @property
    def offloaded(self) -> bool:
        return self.shares[0].device != self.devs[0]

    @property
    def lead(self) -> torch.device:
        return self.devs[0]

    @property
    def windows(self) -> int:
        return sum(x.shape[0] for x in self.shares)

    def forward(self, in_place: bool) -> None:
        """Replica k over device k's share of the windows (in place, or outputs dropped), the
        devices' batches queued in turn so that they compute at the same time."""
        if self.offloaded:
            self.bad = [[None] for _ in self.devs]
            steps = [staged_steps(layer, x, d, in_place, kw, self.fwd_batch, bad)
                     for layer, x, d, kw, bad in zip(self.layers, self.shares, self.devs, self.kwargs, self.bad)]
            interleave(steps, self.devs)
            return
        if len(self.devs) == 1:
            x = self.shares[0]
            run_layer(self.layers[0], x, x if in_place else None, self.kwargs[0], self.fwd_batch)
            return
        interleave([layer_steps(layer, x, x if in_place else None, kw, self.fwd_batch)
                    for layer, x, kw in zip(self.layers, self.shares, self.kwargs)], self.devs)

    def finite(self) -> bool:
        """No NaN/inf in the activations (offloaded: in the last in-place forward's outputs,
        checked on the devices as they were computed)."""
        if self.offloaded:
            return not any(bool(b[0]) for b in self.bad if b[0] is not None)
        return all(all_finite(x) for x in self.shares)

    def gather(self, dev) -> torch.Tensor:
        return gather(self.shares, dev)


def stream_layers(store, team: Team, start: int = 0):
    """Each decoder layer from `start` on, loaded onto the team's first device (store:
    streaming.LayerStore, from host memory or from disk) and replicated on the others
    (team.layers) while the caller works on it, then unloaded again. Yields (index, layer).
    With store.background, the next layer is read onto the device while the caller works
    (LayerStore.load_ahead)."""
    ahead, i = None, start
    try:
        for i in range(start, len(store)):
            layer = ahead.result() if ahead is not None else store.load(i, team.lead)
            ahead = store.load_ahead(i + 1, team.lead)
            team.layers = replicate(layer, team.devs)
            try:
                yield i, layer
            finally:
                team.layers = []
                store.unload(i, layer)
    finally:
        if ahead is not None:  # stopped early: the layer read ahead goes back too
            try:
                store.unload(i + 1, ahead.result())
            except Exception:  # its own read failed: nothing to put back, and an error is already on its way
                pass


@torch.no_grad()
def perplexity(model, spec: ArchSpec, tokens, seqlen: int, dev, dtype, max_windows: int = 0,
               fwd_batch: int = 4, store=None, max_gpu_memory: float | None = None) -> float:
    """exp(mean over non-overlapping windows of the mean token cross-entropy), streamed layer
    by layer so that a model larger than the GPU evaluates. dev: one device or a list; the
    windows are split over them as in compression. store: where the layers are
    (streaming.LayerStore; default: in the model). max_gpu_memory: GiB per device the
    activations may not push the run past (offload_activations)."""
    from streaming import LayerStore
    store = store or LayerStore(model, spec, dtype)
    devs = device_list(dev)
    n = tokens.shape[1] // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    devs = devs[:n]
    windows = [tokens[:, i * seqlen:(i + 1) * seqlen] for i in range(n)]
    offload = offload_activations(model.config, n, seqlen, dtype, devs, max_gpu_memory, solve=False)
    with exact_matmul():
        inps, kwargs = capture_layer_inputs(model, spec, windows, devs[0], dtype, offload)
        team = Team.spread(inps, kwargs, devs, fwd_batch, offload)
        del inps
        for _ in stream_layers(store, team):
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
            logits = top_d[1](top_d[0](x[i:i + 1].to(d))).float()  # (1, T, V)
            target = windows[w0 + i].to(d)
            out.append(torch.nn.functional.cross_entropy(logits[0, :-1], target[0, 1:]))
            yield
        return [float(v) for v in out]
    per_device = interleave([nlls(d, t, x, w0) for d, t, x, w0 in zip(devs, replicate(top, devs), team.shares, first)],
                            devs)
    top.to("cpu")
    return [v for part in per_device for v in part]
