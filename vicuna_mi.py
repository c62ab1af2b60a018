"""Compress a LLaMA-family model: SparseGPT pruning + mixed-precision quantization whose
bit widths follow clusters of mutually informative input channels.

    python vicuna_mi.py MODEL DATASET --sparsity 0.5 --wbits 4 --target_avg_bits 4.0 \\
        --use_mi_grouping 1 --n_groups 10 --nsamples 128 --save DIR

The model stays on the CPU; one decoder layer at a time goes to the GPU(s) with the
calibration activations, is compressed linear group by linear group in true-sequential
order, and its outputs feed the next layer. Perplexity is evaluated the same way. With
several GPUs each holds a replica of the layer and a share of the windows (parallel.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DEFAULT_GPUS = None  # GPUs used when CUDA_VISIBLE_DEVICES is unset, e.g. "2,3" as the original; None: all

SUPPORTED_HELP = "llama (LLaMA 1/2/3, Vicuna, Yi), mistral, qwen2, qwen3"


# ---------------------------------------------------------------- architectures
@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of a decoder-only family live, and its linears in true-sequential order
    (linears of one inner tuple share their input)."""
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    rotary: str | None = "model.rotary_emb"
    norm: str = "model.norm"
    head: str = "lm_head"
    groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),    # LLaMA 1/2/3, Vicuna, Yi; GQA through num_key_value_heads
    "mistral": ArchSpec(),  # sliding-window attention lives inside the layer
    "qwen2": ArchSpec(),    # q/k/v carry biases: kept, only weights are compressed
    "qwen3": ArchSpec(),    # q/k norms inside attention
}


def get_module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class CompressConfig:
    """Everything the per-layer compression needs; built once from the CLI."""
    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0
    wbits: int = 16
    groupsize: int = -1
    sym: bool = False
    target_avg_bits: float = 4.0
    use_mi_grouping: bool = True
    n_groups: int = 10
    min_bits: int = 2
    max_bits: int = 8
    percdamp: float = 0.01
    blocksize: int = 128
    rtn: bool = False
    act_order: bool = False
    mi_method: str = "gaussian"
    grouping: str = "mi_hessian"
    mi_tokens: int = 8192
    mask_scope: str = "row"
    no_kernel: bool = False
    seed: int = 0

    @property
    def mixed(self) -> bool:
        """MI mode: per-cluster widths around the target (quantization on, MI grouping on)."""
        return self.use_mi_grouping and self.wbits < 16 and not self.rtn


class UsageError(Exception):
    """Bad input the user can fix; reported as one line with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Prune (SparseGPT) and quantize a LLaMA-family model with MI-grouped mixed precision.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="hub id (e.g. lmsys/vicuna-13b-v1.5), local model folder, or local .gguf file")
    p.add_argument("dataset", help="calibration data: wikitext2, ptb, c4, or a local .txt/.jsonl file or folder")
    p.add_argument("--nsamples", type=int, default=128, help="number of calibration windows")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and clustering")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration/evaluation window")
    p.add_argument("--sparsity", type=float, default=0.0, help="unstructured sparsity per output row, in [0, 1)")
    p.add_argument("--prunen", type=int, default=0, help="N of N:M structured sparsity (e.g. 2 for 2:4)")
    p.add_argument("--prunem", type=int, default=0, help="M of N:M structured sparsity (e.g. 4 for 2:4)")
    p.add_argument("--wbits", type=int, default=16,
                   help="uniform mode: bit width of every weight (2..8; 16 = no quantization). "
                        "MI mode (--use_mi_grouping 1): any value below 16 switches quantization on; "
                        "the widths then come from --target_avg_bits within [--min_bits, --max_bits]")
    p.add_argument("--groupsize", type=int, default=-1,
                   help="uniform mode: scale/zero per this many input columns (-1 = per output row)")
    p.add_argument("--sym", action="store_true", help="symmetric quantization grid (default asymmetric)")
    p.add_argument("--target_avg_bits", type=float, default=4.0,
                   help="MI mode: average bits per weight each linear must meet (never exceeded by > 0.01)")
    p.add_argument("--use_mi_grouping", type=int, default=1, choices=[0, 1],
                   help="1: cluster input channels by mutual information, one bit width per cluster; "
                        "0: uniform SparseGPT/GPTQ baseline")
    p.add_argument("--n_groups", type=int, default=10, help="MI mode: clusters of input channels per linear")
    p.add_argument("--min_bits", type=int, default=2, help="MI mode: smallest width a cluster may get")
    p.add_argument("--max_bits", type=int, default=8, help="MI mode: largest width a cluster may get")
    p.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of its mean diagonal")
    p.add_argument("--blocksize", type=int, default=128, help="columns per lazy-update block of the solver")
    p.add_argument("--rtn", action="store_true",
                   help="baseline: round-to-nearest at --wbits/--groupsize (and magnitude pruning), no calibration")
    p.add_argument("--act_order", action="store_true",
                   help="uniform mode: process columns by descending Hessian diagonal (always on in MI mode)")
    p.add_argument("--mi_method", default="gaussian", choices=["gaussian", "binned"],
                   help="MI estimator: Gaussian from the covariance, or equal-frequency binning on a token sample")
    p.add_argument("--grouping", default="mi_hessian", choices=["mi", "mi_hessian", "random", "contiguous", "hessian"],
                   help="how channels are grouped in MI mode: spectral clustering of the MI affinity (mi), of the "
                        "MI affinity weighted by similar Hessian diagonal (mi_hessian); random/contiguous/hessian "
                        "(equal groups by diag(H) rank) are ablations")
    p.add_argument("--no_kernel", action="store_true",
                   help="run the solver's plain PyTorch column loop instead of the fused Triton kernel on CUDA")
    p.add_argument("--mi_tokens", type=int, default=8192, help="tokens sampled for the binned MI estimator")
    p.add_argument("--mask_scope", default="row", choices=["row", "block"],
                   help="unstructured sparsity exact per output row, or one threshold per 128-column block "
                        "over all rows as the reference SparseGPT")
    p.add_argument("--eval", nargs="+", default=["wikitext2", "ptb", "c4"],
                   help="datasets to evaluate perplexity on (names or local files); 'none' to skip")
    p.add_argument("--eval_windows", type=int, default=0,
                   help="evaluate at most this many windows per dataset (0 = the whole protocol)")
    p.add_argument("--save", default=None, help="folder to write the compressed model and compression_report.json")
    p.add_argument("--overwrite", action="store_true", help="allow --save into a non-empty folder")
    p.add_argument("--save_format", default="fake", choices=["fake", "packed"],
                   help="fake: dense safetensors holding the dequantized weights (save_pretrained); packed: "
                        "packed.safetensors with bit-packed codes, scales, zeros, permutation and sparsity mask "
                        "(load with packing.load_packed), plus a GPTQ-layout copy in gptq/ where the "
                        "quantization is uniform, unpermuted and unpruned")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write PNG figures: bits per layer and linear, and layer 0's MI matrix ordered by cluster")
    p.add_argument("--log_json", default=None, metavar="FILE",
                   help="write machine-readable progress, one JSON object per line (per linear, per layer, "
                        "per evaluated dataset), flushed as written")
    p.add_argument("--device", default=None,
                   help="torch device, or several comma-separated (cuda:0,cuda:1) to spread each layer over them "
                        "(default: every visible CUDA GPU; CUDA_VISIBLE_DEVICES chooses them)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="model dtype (auto: float16 on GPU, float32 on CPU)")
    p.add_argument("--fwd_batch", type=int, default=4, help="calibration windows per layer forward call")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its per-layer checkpoints in the work folder (the "
                        "other flags must match the interrupted run); needs --save or --work_dir")
    p.add_argument("--work_dir", default=None, metavar="DIR",
                   help="folder for the per-layer checkpoints (default with --save: SAVE.work beside it); "
                        "removed when the run finishes")
    p.add_argument("--no_checkpoint", action="store_true",
                   help="write no per-layer checkpoints (saves about one copy of the weights plus one "
                        "nsamples x seqlen x hidden activation file per layer of disk writes; the run cannot "
                        "be resumed)")
    return p


def validate(args) -> None:
    """Reject inconsistent flags before anything is loaded."""
    if not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if (args.prunen > 0) != (args.prunem > 0) or args.prunen < 0 or (args.prunem and args.prunen >= args.prunem):
        raise UsageError(f"--prunen/--prunem must both be 0 or satisfy 0 < N < M, got {args.prunen}:{args.prunem}")
    if args.prunen and args.sparsity:
        raise UsageError("use either --sparsity (unstructured) or --prunen/--prunem (N:M), not both")
    if args.prunem and args.blocksize % args.prunem:
        raise UsageError(f"--blocksize {args.blocksize} must be a multiple of --prunem {args.prunem}")
    if not (2 <= args.wbits <= 8 or args.wbits == 16):
        raise UsageError(f"--wbits must be in 2..8 or 16 (no quantization), got {args.wbits}")
    for name in ("min_bits", "max_bits"):
        if not 2 <= getattr(args, name) <= 8:
            raise UsageError(f"--{name} must be in 2..8, got {getattr(args, name)}")
    if args.min_bits > args.max_bits:
        raise UsageError(f"--min_bits {args.min_bits} exceeds --max_bits {args.max_bits}")
    if not args.min_bits <= args.target_avg_bits <= args.max_bits:
        raise UsageError(f"--target_avg_bits {args.target_avg_bits} is outside [--min_bits {args.min_bits}, "
                         f"--max_bits {args.max_bits}]")
    if args.n_groups < 1:
        raise UsageError(f"--n_groups must be at least 1, got {args.n_groups}")
    if args.nsamples < 1:
        raise UsageError(f"--nsamples must be at least 1, got {args.nsamples}")
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.groupsize == 0 or args.groupsize < -1:
        raise UsageError(f"--groupsize must be -1 or positive, got {args.groupsize}")
    if args.percdamp <= 0 or args.blocksize < 1:
        raise UsageError("--percdamp must be positive and --blocksize at least 1")
    if args.resume and args.no_checkpoint:
        raise UsageError("--resume and --no_checkpoint exclude each other")
    if args.resume and not (args.save or args.work_dir):
        raise UsageError("--resume needs the work folder of the interrupted run: pass the same --save, "
                         "or --work_dir")
    if args.save and args.work_dir:
        save, work = Path(args.save).resolve(), Path(args.work_dir).resolve()
        if work == save or save in work.parents or work in save.parents:
            raise UsageError(f"--work_dir {args.work_dir} must lie outside --save {args.save} (and not contain it)")
    if args.save and Path(args.save).exists() and not args.overwrite:
        p = Path(args.save)
        if not p.is_dir() or any(p.iterdir()):
            raise UsageError(f"--save folder {args.save} exists and is not empty; pass --overwrite to replace it")


def config_from_args(args) -> CompressConfig:
    names = CompressConfig.__dataclass_fields__
    vals = {k: getattr(args, k) for k in names}
    vals["use_mi_grouping"] = bool(args.use_mi_grouping)
    return CompressConfig(**vals)


# ---------------------------------------------------------------- device and loading
def pick_devices(requested: str | None) -> list:
    """The devices to compress on: --device (one, or several comma-separated), else every
    visible CUDA GPU (CUDA_VISIBLE_DEVICES chooses them; DEFAULT_GPUS when it is unset)."""
    import torch
    from parallel import device_list
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if requested:
        try:
            devs = device_list(requested)
        except RuntimeError as e:
            raise UsageError(f"--device {requested}: {e}") from None
        for d in devs:
            if d.type == "cuda":
                if not torch.cuda.is_available():
                    raise UsageError(f"--device {requested}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES={visible!r})")
                if (d.index or 0) >= torch.cuda.device_count():
                    raise UsageError(f"--device {requested}: {d} does not exist; {torch.cuda.device_count()} GPU(s) "
                                     f"are visible (CUDA_VISIBLE_DEVICES={visible!r}, numbered from cuda:0)")
            elif d.type != "cpu":
                raise UsageError(f"--device {requested}: only cuda and cpu devices are supported")
        gpus = [d for d in devs if d.type == "cuda"]
        if len(set(gpus)) < len(gpus):
            raise UsageError(f"--device {requested}: a GPU is listed twice")
        return devs
    if torch.cuda.is_available():
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    gpus = Path("/proc/driver/nvidia/gpus")
    n = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    if n:
        raise UsageError(f"CUDA_VISIBLE_DEVICES={visible!r} leaves none of this "
                         f"machine's {n} GPU(s) visible; choose GPUs with e.g. CUDA_VISIBLE_DEVICES=0 "
                         f"or edit DEFAULT_GPUS at the top of vicuna_mi.py")
    raise UsageError("no CUDA GPU found; pass --device cpu to run on the CPU (slow, for small models only)")


def model_location(model: str) -> tuple[str, dict]:
    """(name or folder for from_pretrained, extra kwargs) for a hub id, folder or .gguf file."""
    p = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not p.is_file():
            raise UsageError(f"model file {model} does not exist")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"model path {model} is a file; pass a model folder, a .gguf file or a hub id")
        return str(p), {}
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep + os.sep in model:
        raise UsageError(f"model path {model} does not exist")
    return model, {}


def load_config(model: str, trust_remote_code: bool):
    from transformers import AutoConfig
    where, extra = model_location(model)
    try:
        cfg = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except ImportError as e:
        raise UsageError(f"loading {model} needs a missing package: {e}")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"could not load the configuration of {model} ({first}); "
                         "if you are offline, pass a local model folder or .gguf file")
    if cfg.model_type not in ARCHS:
        raise UsageError(f"unsupported architecture {cfg.model_type!r} of {model}; supported: {SUPPORTED_HELP}")
    return cfg


def load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer
    where, extra = model_location(model)
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (ImportError, ValueError, OSError) as e:
        text = str(e).lower()
        if "sentencepiece" in text or "tiktoken" in text or "protobuf" in text:
            # transformers 5 converts a SentencePiece tokenizer.model, which needs both packages
            raise UsageError(f"the tokenizer of {model} needs sentencepiece and protobuf: "
                             "pip install sentencepiece protobuf")
        raise UsageError(f"could not load the tokenizer of {model}: {str(e).splitlines()[0] if str(e) else e!r}")


def load_model(model: str, dtype, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM
    where, extra = model_location(model)
    # .bin checkpoints: from_pretrained's weights_only defaults to True (transformers 5.x), which reaches
    # torch.load(..., weights_only=True) in modeling_utils.load_state_dict; nothing here unpickles
    # arbitrary objects. trust_remote_code is only ever the --trust_remote_code flag.
    import pickle
    try:
        m = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 low_cpu_mem_usage=True, **extra)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        raise UsageError(f"the .bin weights of {model} hold more than tensors and were refused (torch.load "
                         f"weights_only=True{': ' + detail if detail else ''}); use a safetensors copy from a "
                         "source you trust")
    except ImportError as e:  # e.g. GGUF files need accelerate and gguf
        raise UsageError(f"loading {model} needs a missing package: {str(e).splitlines()[0]} "
                         "(pip install -r requirements.txt)")
    m.config.use_cache = False
    m.eval()
    torch.set_grad_enabled(False)
    return m


# ---------------------------------------------------------------- capture and layer runner
class _StopForward(Exception):
    """Raised from a hook once it has what it needs, to skip the rest of a forward pass."""


def capture_layer_inputs(model, spec: ArchSpec, windows, dev, dtype):
    """Run embeddings (and rotary) on `dev` and capture the hidden states entering layer 0
    for every window (1, seqlen), together with every keyword argument the model passes
    its decoder layers. Returns inps (N, seqlen, hidden) and the kwargs."""
    import torch
    layers = get_module(model, spec.layers)
    parts = [get_module(model, spec.embed)] + ([get_module(model, spec.rotary)] if spec.rotary else [])
    for m in parts:
        m.to(dev)
    seqlen = windows[0].shape[-1]
    hidden = model.config.hidden_size
    inps = torch.empty(len(windows), seqlen, hidden, device=dev, dtype=dtype)
    state = {"i": 0, "kwargs": None}

    def hook(_module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        inps[state["i"]] = hs[0]
        if state["kwargs"] is None:
            state["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, w in enumerate(windows):
            state["i"] = i
            try:
                get_module(model, spec.layers.rsplit(".", 1)[0])(input_ids=w.to(dev), use_cache=False)
            except _StopForward:
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
    the outputs are dropped (a hook raising _StopForward may cut each call short)."""
    for b0 in range(0, inps.shape[0], batch):
        try:
            out = layer(inps[b0:b0 + batch], **kwargs)
        except _StopForward:
            out = None
        if outs is not None and out is not None:
            outs[b0:b0 + batch] = out[0] if isinstance(out, (tuple, list)) else out
        yield


def run_layer(layer, inps, outs, kwargs: dict, batch: int) -> None:
    """layer_steps run to the end on one device."""
    for _ in layer_steps(layer, inps, outs, kwargs, batch):
        pass


def run_layer_spread(layers: list, shares: list, kwargs: list, batch: int, devs: list, in_place: bool) -> None:
    """Replica k over device k's share of the windows (in place, or outputs dropped), the
    devices' batches queued in turn so that they compute at the same time."""
    if len(devs) == 1:
        run_layer(layers[0], shares[0], shares[0] if in_place else None, kwargs[0], batch)
        return
    from parallel import interleave
    interleave([layer_steps(layer, x, x if in_place else None, kw, batch)
                for layer, x, kw in zip(layers, shares, kwargs)], devs)


# ---------------------------------------------------------------- compression
@dataclass
class LinearReport:
    shape: list[int]
    sparsity: float
    avg_bits: float
    effective_bits: float
    loss: float
    seconds: float
    groups: list[dict] = field(default_factory=list)
    # grid of the quantized weights, for packed saves: perm (in,), runs [(start, end, bits)]
    # over permuted columns, scale/zero (out, n_runs); None where nothing was quantized
    qparams: dict | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "qparams"}


class StageTimer:
    """Seconds per named stage (`with timer("solve"): ...`). When enabled it synchronizes the
    device at each stage boundary so the numbers are true; disabled it costs nothing."""

    def __init__(self, dev=None, enabled: bool = False):
        from parallel import device_list
        self.devs, self.enabled = (device_list(dev) if dev is not None else []), enabled
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        return _Stage(self, stage)


class _Stage:
    def __init__(self, timer: StageTimer, stage: str):
        self.t, self.stage = timer, stage

    def _sync(self):
        if self.t.enabled:
            import torch
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


def choose_groups_and_bits(cfg: CompressConfig, solver, weights: list, columns: int, mi_sample, dev,
                           timer: StageTimer = NO_TIMER, stash: dict | None = None):
    """Channel groups (index tensors) and per-linear widths for one shared-input set of linears.
    Returns groups, bits per linear, MI statistics (or None) and the seconds spent. stash: the
    first MI matrix computed is copied to stash["mi"] (for --plot). dev: a device, or a list of
    them: the clustering runs on the first, the allocation errors are split by rows over all."""
    import torch
    from channel_grouping import allocate_bits, cluster_errors, group_channels, order_groups
    from mutual_info import estimate_mi, mi_summary
    from parallel import device_list, interleave, launched, row_shares
    devs = device_list(dev)
    dev = devs[0]
    tick = time.perf_counter()
    if not cfg.mixed:
        bits = 16 if (cfg.wbits >= 16) else cfg.wbits
        return [torch.arange(columns, device=dev)], [[bits] for _ in weights], None, 0.0
    H = solver.hessian()
    diag = torch.diag(H)
    k = min(cfg.n_groups, columns)
    stats = None
    if cfg.grouping in ("mi", "mi_hessian"):
        with timer("mi"):
            mi = estimate_mi(cfg.mi_method, H, solver.mean(), mi_sample)
            stats = mi_summary(mi)
            if stash is not None and "mi" not in stash:
                stash["mi"] = mi.to("cpu", copy=True)  # before the in-place clustering
        with timer("clustering"):
            groups = group_channels(cfg.grouping, k, mi=mi, diag=diag, seed=cfg.seed, inplace=True)
            del mi
    else:
        with timer("clustering"):
            groups = group_channels(cfg.grouping, k, diag=diag, seed=cfg.seed, columns=columns)
    groups = order_groups(groups, diag)
    candidates = list(range(cfg.min_bits, cfg.max_bits + 1))
    sizes = [int(g.numel()) for g in groups]
    bits = []
    sparsity = cfg.sparsity or (cfg.prunen / cfg.prunem if cfg.prunem else 0.0)
    with timer("allocation"):  # one pass over the stacked linears that share H; rows split over devices
        shares = row_shares([W.shape[0] for W in weights], len(devs))
        used = devs[:len(shares)]

        def errors(d, share):
            Hd = H if d == dev else H.to(d)
            gd = groups if d == dev else [g.to(d) for g in groups]
            return cluster_errors(torch.cat([W[rows].to(d) for W, rows in zip(weights, share)], 0), Hd, gd,
                                  candidates, sparsity, cfg.sym, row_splits=[r.stop - r.start for r in share],
                                  on_device=True)
        parts = interleave([launched(errors, d, share) for d, share in zip(used, shares)], used)
        errs = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        bits = [allocate_bits(err, sizes, candidates, cfg.target_avg_bits) for err in errs]
    for d in devs:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    return groups, bits, stats, time.perf_counter() - tick


def compress_layer(layers: list, index: int, spec: ArchSpec, cfg: CompressConfig, shares: list, kwargs: list,
                   devs: list, log, fwd_batch: int, timer: StageTimer = NO_TIMER,
                   stash: dict | None = None) -> dict[str, LinearReport]:
    """Compress the linears of one decoder layer in true-sequential order. layers[0] is the
    layer on devs[0], layers[k] its replica on devs[k] (parallel.replicate); shares[k] and
    kwargs[k] are device k's calibration inputs and the layer's keyword arguments there. The
    replicas get every compressed weight as soon as it exists."""
    import torch
    from mutual_info import TokenSample
    from parallel import interleave, row_shares
    from sparsegpt_mi import LinearSolver, group_overhead_bits, merge_row_shares, rtn_quantize
    layer, dev = layers[0], devs[0]
    nwin = sum(x.shape[0] for x in shares)
    reports: dict[str, LinearReport] = {}
    for names in spec.groups:
        linears = [get_module(layer, n) for n in names]
        columns = linears[0].in_features
        for name, lin in zip(names, linears):
            if not torch.isfinite(lin.weight).all():
                raise FloatingPointError(f"layer {index} {name}: the model's own weights hold NaN/inf before "
                                         "compression; the checkpoint is damaged or overflowed its dtype (try "
                                         "--dtype float32 or bfloat16, or a fresh copy of the model)")
        if cfg.rtn:
            for name, lin in zip(names, linears):
                tick = time.perf_counter()
                W = lin.weight.data.float()
                if cfg.sparsity > 0 or cfg.prunen:
                    W = magnitude_prune(W, cfg)
                qparams = None
                Q = W
                if cfg.wbits < 16:
                    Q, scale, zero = rtn_quantize(W, cfg.wbits, cfg.groupsize, cfg.sym)
                    g = columns if cfg.groupsize <= 0 else cfg.groupsize
                    qparams = {"perm": torch.arange(columns), "scale": scale.cpu(), "zero": zero.cpu(),
                               "runs": [(c0, min(c0 + g, columns), cfg.wbits) for c0 in range(0, columns, g)]}
                Q = Q * (W != 0)
                lin.weight.data = Q.to(lin.weight.dtype)
                rep = LinearReport(shape=list(W.shape), sparsity=float((W == 0).float().mean()), avg_bits=float(cfg.wbits),
                                   effective_bits=cfg.wbits + group_overhead_bits([cfg.wbits], [columns], cfg.groupsize),
                                   loss=float("nan"), seconds=time.perf_counter() - tick,
                                   groups=[{"bits": cfg.wbits, "channels": list(range(columns))}], qparams=qparams)
                reports[name] = rep
                log(f"layer {index} {name}  sparsity {rep.sparsity:.3f}  bits {rep.avg_bits:.2f}  {rep.seconds:.1f}s")
            continue
        # one solver (Hessian) and, for the binned estimator, one token sample per device; the
        # samples split the token budget by the devices' shares of the windows
        solvers = [LinearSolver(columns, d) for d in devs]
        binned = cfg.mixed and cfg.grouping.startswith("mi") and cfg.mi_method == "binned"
        samples = [TokenSample(max(1, cfg.mi_tokens * x.shape[0] // max(nwin, 1)),
                               max(1, cfg.mi_tokens // max(1, nwin)), cfg.seed + k) if binned else None
                   for k, x in enumerate(shares)]

        def hook_for(solver, sample):
            def hook(_m, inp, _out):
                solver.add_batch(inp[0].detach())
                if sample is not None:
                    sample.add_batch(inp[0].detach())
                raise _StopForward
            return hook

        handles = [get_module(rep, names[0]).register_forward_hook(hook_for(sv, sm))
                   for rep, sv, sm in zip(layers, solvers, samples)]
        try:
            with timer("forward+hessian"):
                run_layer_spread(layers, shares, kwargs, fwd_batch, devs, in_place=False)
        finally:
            for h in handles:
                h.remove()
        solver, sample = solvers[0], samples[0]
        for other, other_sample in zip(solvers[1:], samples[1:]):  # gather the devices' statistics on the first
            solver.absorb(other)
            other.free()
            if sample is not None:
                sample.absorb(other_sample)

        weights = [lin.weight.data for lin in linears]
        groups, bits, mi_stats, group_secs = choose_groups_and_bits(cfg, solver, weights, columns, sample, devs,
                                                                    timer, stash)
        if mi_stats is not None:
            log(f"layer {index} {'/'.join(n.split('.')[-1] for n in names)}  MI mean {mi_stats['mean']:.4f}  "
                f"max {mi_stats['max']:.3f}  >0.1 {mi_stats['frac_above_0.1']:.3f}  groups {len(groups)}  "
                f"grouping {group_secs:.2f}s")
        with timer("solve"):  # output rows are independent given H: each device solves a share of them
            coupled = cfg.mask_scope == "block" and cfg.sparsity > 0 and not cfg.prunen  # one threshold over all rows
            shares_rows = row_shares([W.shape[0] for W in weights], 1 if coupled else len(devs))
            used = devs[:len(shares_rows)]
            twins = [solver] + [solver.copy_to(d) for d in used[1:]]  # before any solve consumes H

            options = dict(sparsity=cfg.sparsity, prunen=cfg.prunen, prunem=cfg.prunem,
                           groupsize=cfg.groupsize if not cfg.mixed else -1, sym=cfg.sym, percdamp=cfg.percdamp,
                           blocksize=cfg.blocksize, act_order=cfg.mixed or cfg.act_order,
                           mask_scope=cfg.mask_scope, use_kernel=not cfg.no_kernel)
            if len(used) == 1:
                results = solver.solve(weights, groups, bits, **options)
            else:  # the devices' column blocks queued in turn
                parts = interleave([sv.solve_steps([W[r] for W, r in zip(weights, rows)], groups, bits, **options)
                                    for sv, rows in zip(twins, shares_rows)], used)
                results = merge_row_shares(parts, dev)
            for sv in twins:
                sv.free()
        sizes = [int(g.numel()) for g in groups]
        for name, lin, res, b in zip(names, linears, results, bits):
            if not torch.isfinite(res.weight).all():
                raise FloatingPointError(f"layer {index} {name}: the solver produced NaN/inf weights; "
                                         "try a larger --percdamp or more --nsamples")
            lin.weight.data = res.weight.to(dev, lin.weight.dtype)
            for replica in layers[1:]:  # the next group's forward passes run on the compressed weights
                other = get_module(replica, name).weight
                other.data = lin.weight.data.to(other.device)
            eff = res.avg_bits + group_overhead_bits(b, sizes, cfg.groupsize if not cfg.mixed else -1) \
                if res.avg_bits < 16 else 16.0
            if cfg.mixed:
                eff += math.ceil(math.log2(max(columns, 2))) / lin.out_features  # the stored permutation
            rep = LinearReport(shape=[lin.out_features, columns], sparsity=res.sparsity, avg_bits=res.avg_bits,
                               effective_bits=eff, loss=res.loss, seconds=res.seconds + group_secs / len(names),
                               groups=[{"bits": int(bb), "channels": g.tolist()} for bb, g in zip(b, groups)],
                               qparams=None if res.avg_bits >= 16 else
                               {"perm": res.perm, "runs": res.runs, "scale": res.scale, "zero": res.zero})
            reports[name] = rep
            if cfg.mixed and res.avg_bits < cfg.target_avg_bits - 0.01 - 1e-9:
                log(f"warning: layer {index} {name}: the least-error widths average {res.avg_bits:.3f} bits, "
                    f"{cfg.target_avg_bits - res.avg_bits:.3f} under the target {cfg.target_avg_bits}")
            log(f"layer {index} {name}  loss {res.loss:.3e}  sparsity {res.sparsity:.3f}  bits {res.avg_bits:.2f}  "
                f"{rep.seconds:.1f}s")
    return reports


def magnitude_prune(W, cfg: CompressConfig):
    """Baseline pruning by |w|: per row (unstructured) or per M consecutive weights (N:M)."""
    import torch
    R, C = W.shape
    if cfg.prunen:
        blocks = W.abs().reshape(R, C // cfg.prunem, cfg.prunem)
        idx = torch.topk(blocks, cfg.prunen, dim=2, largest=False).indices
        mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, idx, True).reshape(R, C)
    else:
        k = int(round(cfg.sparsity * C))
        mask = torch.zeros_like(W, dtype=torch.bool)
        if k:
            mask.scatter_(1, torch.topk(W.abs(), k, dim=1, largest=False).indices, True)
    return W.masked_fill(mask, 0)


def compress_model(model, spec: ArchSpec, cfg: CompressConfig, windows, dev, dtype, log,
                   fwd_batch: int = 4, timer: StageTimer = NO_TIMER,
                   stash: dict | None = None, checkpoint: Checkpointer | None = None) -> dict[str, LinearReport]:
    """Layer-by-layer compression of the whole model; returns a report per linear. stash: see
    choose_groups_and_bits (layer 0's first MI matrix lands there). checkpoint: each finished
    layer is written there; in resume mode the layers it already holds are loaded instead of
    compressed, and the next layer starts from the saved activations.

    Nothing here draws from the global RNGs: clustering, the binned-MI token sample and the
    random grouping each seed their own generator with cfg.seed per call, so a resumed run
    computes exactly what an uninterrupted one does.

    dev: one device or a list (see parallel.py): the windows are split over the devices and
    each layer is replicated on all of them while it is compressed."""
    import torch
    from parallel import device_list, gather, replicate, scatter, to_device
    devs = device_list(dev)
    dev = devs[0]
    layers = get_module(model, spec.layers)
    reports: dict[str, LinearReport] = {}
    if cfg.rtn:
        devs = [dev]  # nothing to spread: no calibration forward passes
        inps = torch.empty(0, 1, device=dev)
        kwargs = {}
    else:
        inps, kwargs = capture_layer_inputs(model, spec, windows, dev, dtype)  # kwargs are needed on resume too
    first = 0
    if checkpoint is not None:
        checkpoint.begin(log)
        first = min(checkpoint.load_done(with_activations=not cfg.rtn), len(layers))
        for i in range(first):
            state, reps, extra = checkpoint.load_layer(i)
            layers[i].load_state_dict(state)
            reports.update({f"{spec.layers}.{i}.{n}": r for n, r in reps.items()})
            if stash is not None and "mi" in extra and "mi" not in stash:
                stash["mi"] = extra["mi"]
        if first and first < len(layers) and not cfg.rtn:
            saved = checkpoint.load_activations(first - 1)
            if saved.shape != inps.shape:
                raise UsageError(f"the activations in {checkpoint.folder} have shape {tuple(saved.shape)}, "
                                 f"this run needs {tuple(inps.shape)}; rerun without --resume")
            inps.copy_(saved)
            del saved
        if first:
            log(f"resumed from {checkpoint.folder}: layers 0..{first - 1} restored, "
                f"{len(layers) - first} to go")
    shares = scatter(inps, devs)  # each device's windows
    del inps
    kwargs = [kwargs] + [to_device(kwargs, d) for d in devs[1:]]
    start = time.perf_counter()
    for i, layer in enumerate(layers):
        if i < first:
            continue
        tick = time.perf_counter()
        layer.to(dev)
        team = replicate(layer, devs)
        reps = compress_layer(team, i, spec, cfg, shares, kwargs, devs, log, fwd_batch, timer, stash)
        reports.update({f"{spec.layers}.{i}.{n}": r for n, r in reps.items()})
        if not cfg.rtn:
            with timer("forward outputs"):  # in place: the next layer's inputs
                run_layer_spread(team, shares, kwargs, fwd_batch, devs, in_place=True)
            if not all(bool(torch.isfinite(x).all()) for x in shares):
                raise FloatingPointError(f"layer {i}: NaN/inf in the compressed layer's outputs; "
                                         "try a larger --percdamp, more --nsamples or --dtype bfloat16")
        del team
        layer.to("cpu")
        if checkpoint is not None:
            checkpoint.save_layer(i, layer, reps, None if cfg.rtn else gather(shares, "cpu"),
                                  {"mi": stash["mi"]} if i == 0 and stash and "mi" in stash else None)
        done = i + 1
        elapsed = time.perf_counter() - start
        log(f"layer {i} done in {time.perf_counter() - tick:.1f}s  [{done}/{len(layers)}, "
            f"eta {elapsed / (done - first) * (len(layers) - done):.0f}s]")
    return reports


# ---------------------------------------------------------------- checkpoints (--resume)
def run_fingerprint(cfg: CompressConfig, args, dtype, n_devices: int = 1) -> dict:
    """What must match for a work folder to be resumed: every CompressConfig field, the model
    and data (local paths resolved), the sampling, the dtype, the forward batch and the number
    of devices (both set the Hessian's summation order). JSON-ready."""
    def where(name: str) -> str:
        p = Path(name).expanduser()
        return str(p.resolve()) if p.exists() else name
    return json.loads(json.dumps({"config": asdict(cfg), "model": where(args.model), "dataset": where(args.dataset),
                                  "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                                  "dtype": str(dtype).replace("torch.", ""), "fwd_batch": args.fwd_batch,
                                  "devices": n_devices}))


def work_folder(args) -> Path | None:
    """--work_dir, else SAVE.work beside --save, else None (no checkpoints)."""
    if args.no_checkpoint:
        return None
    if args.work_dir:
        return Path(args.work_dir).expanduser().resolve()
    if args.save:
        out = Path(args.save).expanduser().resolve()
        return out.parent / f"{out.name}.work"
    return None


class Checkpointer:
    """Per-layer checkpoints in a work folder, each written atomically (temporary file in the
    folder, fsync, os.replace):

        fingerprint.json    the run's configuration (run_fingerprint); a resume must match it
        layer_0007.pt       layer 7's compressed parameters, its LinearReports (qparams
                            included) and, for layer 0 with --plot, the MI matrix
        acts_0007.pt        the calibration activations leaving layer 7 (only the latest is
                            kept; older ones are deleted once it is safely on disk)

    Everything is plain dicts, lists and tensors, read back with torch.load(weights_only=True).
    Layers 0..k count as done when all their layer files and acts_k exist."""

    FINGERPRINT = "fingerprint.json"

    def __init__(self, folder: Path, fingerprint: dict, resume: bool):
        self.folder, self.fingerprint, self.resume = Path(folder), fingerprint, resume
        marker = self.folder / self.FINGERPRINT
        if self.folder.exists():
            if not self.folder.is_dir():
                raise UsageError(f"work folder {self.folder} is a file")
            if not marker.exists() and any(self.folder.iterdir()):
                raise UsageError(f"work folder {self.folder} is not empty and holds no {self.FINGERPRINT}; "
                                 "it is not a checkpoint folder of this tool, choose another --work_dir")
        if resume and marker.exists():
            old = json.loads(marker.read_text())
            if old != fingerprint:
                diff = _fingerprint_diff(old, fingerprint)
                raise UsageError(f"the checkpoints in {self.folder} come from a different run ({diff}); "
                                 "resume with the original flags, or rerun without --resume to start over")

    def begin(self, log) -> None:
        """Start of compression: without resume, clear a work folder an earlier run left; then
        make the folder and record the fingerprint."""
        if self.folder.exists() and not self.resume and any(self.folder.iterdir()):
            log(f"clearing the work folder {self.folder} left by an earlier run (pass --resume to continue it)")
            shutil.rmtree(self.folder)
        if self.resume and not (self.folder / self.FINGERPRINT).exists():
            log(f"--resume: no checkpoints in {self.folder}; starting from layer 0")
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp-*"):  # a write cut short by a crash
            stale.unlink()
        if not (self.folder / self.FINGERPRINT).exists():
            self._write(self.FINGERPRINT, lambda f: f.write(json.dumps(self.fingerprint, indent=1).encode()))

    def load_done(self, with_activations: bool = True) -> int:
        """Number of leading layers whose checkpoints are complete (0 without resume)."""
        if not self.resume:
            return 0
        done = 0
        while (self.folder / f"layer_{done:04d}.pt").exists():
            done += 1
        if with_activations:  # the last layer with activations bounds what can be continued
            while done and not (self.folder / f"acts_{done - 1:04d}.pt").exists():
                done -= 1
        return done

    def load_layer(self, i: int):
        """(state_dict, {linear name: LinearReport}, extra) of layer i."""
        import torch
        d = torch.load(self.folder / f"layer_{i:04d}.pt", map_location="cpu", weights_only=True)
        return d["state"], {n: LinearReport(**r) for n, r in d["reports"].items()}, d.get("extra") or {}

    def load_activations(self, i: int):
        import torch
        return torch.load(self.folder / f"acts_{i:04d}.pt", map_location="cpu", weights_only=True)

    def save_layer(self, i: int, layer, reports: dict[str, LinearReport], inps, extra: dict | None = None) -> None:
        import torch
        state = {k: v.detach().to("cpu").clone() for k, v in layer.state_dict().items()}  # clone: no shared storage
        reps = {n: {f.name: getattr(r, f.name) for f in fields(LinearReport)} for n, r in reports.items()}
        self._write(f"layer_{i:04d}.pt", lambda f: torch.save({"state": state, "reports": reps, "extra": extra}, f))
        if inps is not None:
            acts = inps.detach().to("cpu")
            self._write(f"acts_{i:04d}.pt", lambda f: torch.save(acts, f))
            for old in self.folder.glob("acts_*.pt"):
                if old.name != f"acts_{i:04d}.pt":
                    old.unlink()
        # Testing hook: VICUNA_MI_FAIL_AFTER_LAYER=k ends the process hard (exit code 17, no cleanup)
        # right after layer k's checkpoint is on disk, to simulate a crash for the resume tests.
        if os.environ.get("VICUNA_MI_FAIL_AFTER_LAYER") == str(i):
            os._exit(17)

    def finish(self) -> None:
        """The run is complete (saved): the checkpoints are no longer needed."""
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def _write(self, name: str, write) -> None:
        path = self.folder / name
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        try:  # make the rename itself durable
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def _fingerprint_diff(old: dict, new: dict) -> str:
    flat = lambda d: {**{k: v for k, v in d.items() if k != "config"}, **d.get("config", {})}  # noqa: E731
    a, b = flat(old), flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys[:4]) + \
        (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


# ---------------------------------------------------------------- evaluation
def perplexity(model, spec: ArchSpec, tokens, seqlen: int, dev, dtype, max_windows: int = 0,
               fwd_batch: int = 4) -> float:
    """exp(mean over non-overlapping windows of the mean token cross-entropy), streamed layer
    by layer so that a model larger than the GPU evaluates. dev: one device or a list; the
    windows are split over them as in compression."""
    import torch
    from parallel import device_list, interleave, replicate, scatter, split_counts, to_device
    devs = device_list(dev)
    n = tokens.shape[1] // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    devs = devs[:n]
    windows = [tokens[:, i * seqlen:(i + 1) * seqlen] for i in range(n)]
    inps, kwargs = capture_layer_inputs(model, spec, windows, devs[0], dtype)
    shares = scatter(inps, devs)
    del inps
    kwargs = [kwargs] + [to_device(kwargs, d) for d in devs[1:]]
    for layer in get_module(model, spec.layers):
        layer.to(devs[0])
        team = replicate(layer, devs)
        run_layer_spread(team, shares, kwargs, fwd_batch, devs, in_place=True)  # one activation buffer
        del team
        layer.to("cpu")
    norm, head = get_module(model, spec.norm), get_module(model, spec.head)
    top = torch.nn.ModuleList([norm, head]).to(devs[0])
    first = [0]
    for c in split_counts(n, len(devs))[:-1]:
        first.append(first[-1] + c)

    def nlls(d, top_d, x, w0):  # one window per step; the values stay on the device until the end
        out = []
        for i in range(x.shape[0]):
            logits = top_d[1](top_d[0](x[i:i + 1])).float()  # (1, T, V)
            target = windows[w0 + i].to(d)
            out.append(torch.nn.functional.cross_entropy(logits[0, :-1], target[0, 1:]))
            yield
        return [float(v) for v in out]
    per_device = interleave([nlls(d, t, x, w0) for d, t, x, w0 in zip(devs, replicate(top, devs), shares, first)],
                            devs)
    top.to("cpu")
    values = [v for part in per_device for v in part]  # window order
    return math.exp(sum(values) / len(values))


# ---------------------------------------------------------------- saving and report
def save_model(model, tokenizer, out_dir: str, report: dict, overwrite: bool, packed: dict | None = None) -> None:
    """Write the model (safetensors), tokenizer and report to a temporary folder beside
    out_dir, then rename it into place: a run never leaves a half-written folder.
    packed: keyword arguments of packing.save_packed for --save_format packed (None: dense);
    its disk report goes to report["disk"]."""
    out = Path(out_dir).resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if packed is None:
            plain_model(model).save_pretrained(tmp, safe_serialization=True)
        else:
            import packing
            report["disk"] = packing.save_packed(plain_model(model), tmp, tokenizer, **packed)
        tokenizer.save_pretrained(tmp)
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=1))
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise UsageError(f"--save folder {out} became non-empty during the run")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def plain_model(model):
    """A model plain transformers can save: a GGUF-loaded model carries a quantization
    config that save_pretrained refuses, so rebuild it from its config (weights shared)."""
    import torch
    from transformers import AutoModelForCausalLM
    if getattr(model.config, "quantization_config", None) is None and not getattr(model, "hf_quantizer", None):
        return model
    cfg = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                            if k != "quantization_config"})
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    return fresh


def versions() -> dict:
    import torch
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    v["commit"] = os.environ.get("GIT_COMMIT")  # a copy whose git metadata is absent or stale names it so
    if not v["commit"]:
        try:
            v["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                         capture_output=True, text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            v["commit"] = None
    return v


def summarize(reports: dict[str, LinearReport]) -> dict:
    """Weighted averages over every compressed weight, and the bit distribution."""
    total = sum(r.shape[0] * r.shape[1] for r in reports.values()) or 1
    hist: dict[int, float] = {}
    for r in reports.values():
        rows = r.shape[0]
        for g in r.groups:
            hist[g["bits"]] = hist.get(g["bits"], 0) + rows * len(g["channels"])
    return {
        "avg_bits": sum(r.avg_bits * r.shape[0] * r.shape[1] for r in reports.values()) / total,
        "effective_bits": sum(r.effective_bits * r.shape[0] * r.shape[1] for r in reports.values()) / total,
        "sparsity": sum(r.sparsity * r.shape[0] * r.shape[1] for r in reports.values()) / total,
        "bits_histogram": {str(b): n / total for b, n in sorted(hist.items())},
    }


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf in a layer: the message names it and what to try
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # data errors are user errors too
        from datautils import DataError
        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def run(args) -> int:
    validate(args)
    if DEFAULT_GPUS is not None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", DEFAULT_GPUS)
    from datautils import check_dataset, get_eval_tokens, get_loaders
    cfg = config_from_args(args)
    evals = [] if [e.lower() for e in args.eval] == ["none"] else args.eval
    if not cfg.rtn:
        check_dataset(args.dataset)
    for e in evals:
        check_dataset(e)
    model_cfg = load_config(args.model, args.trust_remote_code)
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if limit and args.seqlen > limit:
        raise UsageError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings {limit}")
    width = min(model_cfg.hidden_size, getattr(model_cfg, "intermediate_size", model_cfg.hidden_size))
    if cfg.mixed and args.n_groups > width:
        print(f"warning: --n_groups {args.n_groups} exceeds the {width} input channels of the smallest "
              f"linear; capped per linear", file=sys.stderr)

    import numpy as np
    import torch
    devs = pick_devices(args.device)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.float16 if devs[0].type == "cuda" else torch.float32)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.simplefilter("always", UserWarning)
    folder = work_folder(args)
    checkpoint = Checkpointer(folder, run_fingerprint(cfg, args, dtype, len(devs)), args.resume) if folder else None
    if not sys.stderr.isatty():  # logs to a file or pipe: no carriage-return bars (loading, writing, downloads)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()

    spec = ARCHS[model_cfg.model_type]
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    print(f"loading {args.model} ({model_cfg.model_type}, {model_cfg.num_hidden_layers} layers) as {dtype} on the CPU;"
          f" compressing on {', '.join(map(str, devs))}", flush=True)
    model = load_model(args.model, dtype, args.trust_remote_code)
    import plots
    jlog = plots.JsonLog(args.log_json)  # a no-op without --log_json
    jlog.event("start", model=args.model, dataset=args.dataset, config=vars(args))
    log = jlog.tee(_logger())
    mi_stash = {} if args.plot else None
    t0 = time.perf_counter()
    windows = [] if cfg.rtn else get_loaders(args.dataset, tokenizer, args.nsamples, args.seed, args.seqlen)
    reports = compress_model(model, spec, cfg, windows, devs, dtype, log, args.fwd_batch, stash=mi_stash,
                             checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    summary = summarize(reports)
    print(f"compressed in {seconds:.1f}s: sparsity {summary['sparsity']:.3f}  avg bits {summary['avg_bits']:.3f}  "
          f"effective bits {summary['effective_bits']:.3f}", flush=True)
    print("bit distribution (fraction of weights): " +
          "  ".join(f"{b}b {f:.3f}" for b, f in summary["bits_histogram"].items()), flush=True)
    jlog.event("compressed", seconds=seconds, **summary)
    if args.plot:
        for path in plots.write_plots(args.plot, reports, mi_stash, spec.layers, spec.groups[0]):
            print(f"plot {path}", flush=True)

    ppl = {}
    for name in evals:
        tokens = get_eval_tokens(name, tokenizer, args.seqlen)
        ppl[name] = perplexity(model, spec, tokens, args.seqlen, devs, dtype, args.eval_windows, args.fwd_batch)
        print(f"{name} ppl {ppl[name]:.3f}", flush=True)
        jlog.event("eval", dataset=name, ppl=ppl[name])

    report = {"config": vars(args), "versions": versions(), **summary, "ppl": ppl, "seconds": seconds,
              "linears": {k: v.to_json() for k, v in reports.items()}}
    if args.save:
        packed = None if args.save_format == "fake" else \
            {"reports": reports, "nm": (cfg.prunen, cfg.prunem), "pruned": bool(cfg.sparsity or cfg.prunen)}
        save_model(model, tokenizer, args.save, report, args.overwrite, packed)
        if "disk" in report:
            import packing
            print(packing.describe_disk(report["disk"]), flush=True)
        print(f"saved to {args.save}", flush=True)
        jlog.event("saved", folder=args.save, format=args.save_format, disk=report.get("disk"))
    if checkpoint is not None:  # saved (or, without --save, evaluated): the checkpoints have served
        checkpoint.finish()
    jlog.event("done", ppl=ppl)
    jlog.close()
    return 0


def _logger():
    """print for each log line: plain lines (no progress bars), so logs read well in files."""
    def log(msg: str) -> None:
        print(msg, flush=True)
    return log


if __name__ == "__main__":
    sys.exit(main())
