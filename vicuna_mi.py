"""Compress a LLaMA-family model: SparseGPT pruning + mixed-precision quantization whose
bit widths follow clusters of mutually informative input channels. This file is the command
line: flags, their validation, the choice of devices, and the run from loading to report.

    python vicuna_mi.py MODEL DATASET --sparsity 0.5 --wbits 4 --target_avg_bits 4.0 \\
        --use_mi_grouping 1 --n_groups 10 --nsamples 128 --save DIR

One decoder layer at a time goes to the GPU(s) with the calibration activations
(layerwise.py), is compressed linear set by linear set in true-sequential order
(compress.py), and its outputs feed the next layer. A local safetensors checkpoint (or a hub
model's, downloaded once, or a .gguf file's conversion, made once) is streamed: only the
embeddings, norm and head are held in host memory, each layer is read from disk when it is its
turn and written to --save as soon as it is compressed (streaming.py). The compressed model is saved before it is evaluated, and the
evaluation reads the saved layers.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from pathlib import Path

DEFAULT_GPUS = None  # GPUs used when CUDA_VISIBLE_DEVICES is unset, e.g. "2,3" as the original; None: all
# The solver's C x C buffers change size from one linear set to the next (4096, then 11008 columns
# at 7B); with fixed segments the cached blocks fragment, and under --max_gpu_memory a 70B layer
# failed with 5 GiB reserved but unusable. Growable segments avoid that (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from config import TRIAL_ROWS, CompressConfig, UsageError  # noqa: E402
from model_io import check_save_target  # noqa: E402




# ---------------------------------------------------------------- flags
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
                   help="MI mode: bits per weight no linear may exceed: weight bits, or everything the packed file "
                        "stores (see --bits_budget)")
    p.add_argument("--bits_budget", default="weight", choices=["weight", "stored"],
                   help="MI mode: what --target_avg_bits bounds: the weights' widths (weight), or every bit the "
                        "packed file holds for a linear: codes, fp16 scales, zero points, permutation and sparsity "
                        "encoding (stored)")
    p.add_argument("--use_mi_grouping", type=int, default=1, choices=[0, 1],
                   help="1: cluster input channels by mutual information, one bit width per cluster; "
                        "0: uniform SparseGPT/GPTQ baseline")
    p.add_argument("--n_groups", type=_n_groups, default=None,
                   help="MI mode: clusters of input channels per linear, or 'auto': the number with the least "
                        "error within the budget, up to --n_groups_max (default: 10 with --bits_budget weight, "
                        "auto with stored)")
    p.add_argument("--n_groups_max", type=int, default=32, help="MI mode: the most clusters --n_groups auto tries")
    p.add_argument("--auto_groupsize", type=int, default=128,
                   help="MI mode, --n_groups auto with --bits_budget stored: also try each number of clusters with "
                        "clusters longer than this cut into runs of this many columns, each with its own scale and "
                        "zero point, paid from the same budget (0: whole clusters only)")
    p.add_argument("--auto_select", default="solve", choices=["solve", "proxy"],
                   help="MI mode, --n_groups auto: choose among the plans by the solver's calibration loss on trial "
                        f"solves of up to {TRIAL_ROWS} rows per linear (solve: the proxy's best plans and their neighbours, "
                        "a few solves more per linear set), or by the allocation's round-to-nearest error (proxy)")
    p.add_argument("--min_bits", type=int, default=2, help="MI mode: smallest width a cluster may get")
    p.add_argument("--max_bits", type=int, default=8, help="MI mode: largest width a cluster may get")
    p.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of its mean diagonal")
    p.add_argument("--blocksize", type=int, default=128, help="columns per lazy-update block of the solver")
    p.add_argument("--rtn", action="store_true",
                   help="baseline: round-to-nearest at --wbits/--groupsize (and magnitude pruning), no calibration")
    p.add_argument("--act_order", action="store_true",
                   help="uniform mode: process columns by descending Hessian diagonal (always on in MI mode)")
    p.add_argument("--true_sequential", type=int, default=1, choices=[0, 1],
                   help="1: each linear set's Hessian is gathered after the sets before it in the layer are "
                        "compressed (q/k/v, then o, then gate/up, then down). 0: all sets' Hessians from one "
                        "forward pass over the layer as it was, as the reference GPTQ/SparseGPT scripts do by "
                        "default; the sets are then solved at the same time, each on one GPU (with several)")
    p.add_argument("--mi_method", default="gaussian", choices=["gaussian", "binned"],
                   help="MI estimator: Gaussian from the covariance, or equal-frequency binning on a token sample")
    p.add_argument("--grouping", default=None,
                   choices=["mi", "mi_hessian", "corr", "corr_hessian", "hessian_sim", "random", "contiguous",
                            "hessian"],
                   help="how channels are grouped in MI mode: spectral clustering of the MI affinity (mi), of the "
                        "MI affinity weighted by similar Hessian diagonal (mi_hessian); ablations: |correlation| in "
                        "place of MI (corr, corr_hessian), the Hessian-diagonal similarity alone (hessian_sim), "
                        "random, contiguous, and equal groups by diag(H) rank (hessian). Default: mi with "
                        "--sparsity or N:M pruning, mi_hessian without (what measured best for each: README, Results)")
    p.add_argument("--clip", default="mse", choices=["mse", "minmax"],
                   help="range of each quantization grid: the range fraction (1.0 down to 0.5) with the least "
                        "|w - q|^2.4 over its weights (mse; measured better for GPTQ at 3 bits), or min-max")
    p.add_argument("--no_kernel", action="store_true",
                   help="run the solver's plain PyTorch column loop instead of the fused Triton kernel on CUDA")
    p.add_argument("--profile", action="store_true",
                   help="time the compression's stages (forward+hessian, mi, clustering, allocation, trial solves, solve, "
                        "forward outputs, layer in, layer out, checkpoint), the devices synchronized at each "
                        "boundary (a little slower); printed at the end and kept in the report as stage_seconds")
    p.add_argument("--mi_tokens", type=int, default=8192, help="tokens sampled for the binned MI estimator")
    p.add_argument("--mask_scope", default="row", choices=["row", "block"],
                   help="unstructured sparsity exact per output row, or one threshold per 128-column block "
                        "over all rows as the reference SparseGPT")
    p.add_argument("--eval", nargs="+", default=["wikitext2", "ptb", "c4"],
                   help="datasets to evaluate perplexity on (names or local files); 'none' to skip")
    p.add_argument("--eval_windows", type=int, default=0,
                   help="evaluate at most this many windows per dataset (0 = the whole protocol)")
    p.add_argument("--save", default=None, help="folder to write the compressed model and compression_report.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier save of this tool in --save (files it did not write are never deleted)")
    p.add_argument("--save_format", default="fake", choices=["fake", "packed"],
                   help="fake: dense safetensors holding the dequantized weights (save_pretrained); packed: "
                        "packed-*.safetensors shards with bit-packed codes, scales, zeros, permutation and sparsity mask "
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
                   help="dtype to compute and save in (auto: float16 on a GPU; on the CPU computes in float32 and "
                        "saves in the checkpoint's dtype, float16 for GGUF files)")
    p.add_argument("--fwd_batch", type=int, default=4, help="calibration windows per layer forward call")
    p.add_argument("--max_gpu_memory", type=float, default=None, metavar="GIB",
                   help="GiB of GPU memory the run may use per GPU (enforced: torch's per-process limit). Where the "
                        "calibration or evaluation activations would not fit beside one layer and the solver's "
                        "work, they stay in pinned host memory and pass through the GPU a batch at a time "
                        "(results unchanged, some speed lost). Default: no cap, everything on the GPU")
    p.add_argument("--no_stream", action="store_true",
                   help="load the whole model into host memory, as before streaming existed, instead of "
                        "reading one decoder layer at a time from the checkpoint's safetensors files and writing "
                        "each compressed layer to --save at once (.bin-only checkpoints are always loaded whole; "
                        "a .gguf file is converted once to safetensors in the run's dtype, in $VICUNA_MI_CACHE or "
                        "~/.cache/vicuna_mi, and streamed from there)")
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
    if isinstance(args.n_groups, int) and args.n_groups < 1:
        raise UsageError(f"--n_groups must be 'auto' or at least 1, got {args.n_groups}")
    if args.n_groups_max < 1:
        raise UsageError(f"--n_groups_max must be at least 1, got {args.n_groups_max}")
    if args.auto_groupsize < 0:
        raise UsageError(f"--auto_groupsize must be 0 (off) or positive, got {args.auto_groupsize}")
    if args.nsamples < 1:
        raise UsageError(f"--nsamples must be at least 1, got {args.nsamples}")
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.groupsize == 0 or args.groupsize < -1:
        raise UsageError(f"--groupsize must be -1 or positive, got {args.groupsize}")
    if args.percdamp <= 0:
        raise UsageError(f"--percdamp must be positive, got {args.percdamp}")
    if not 1 <= args.blocksize <= 128:
        raise UsageError(f"--blocksize must be in 1..128, got {args.blocksize} (the fused solver kernel holds one "
                         "block of columns in registers)")
    if args.max_gpu_memory is not None and not args.max_gpu_memory > 0:
        raise UsageError(f"--max_gpu_memory must be a positive number of GiB, got {args.max_gpu_memory}")
    if args.resume and args.no_checkpoint:
        raise UsageError("--resume and --no_checkpoint exclude each other")
    if args.resume and not (args.save or args.work_dir):
        raise UsageError("--resume needs the work folder of the interrupted run: pass the same --save, "
                         "or --work_dir")
    if args.save and args.work_dir:
        save, work = Path(args.save).resolve(), Path(args.work_dir).resolve()
        if work == save or save in work.parents or work in save.parents:
            raise UsageError(f"--work_dir {args.work_dir} must lie outside --save {args.save} (and not contain it)")
    if args.save:
        check_save_target(args.save, args.overwrite)


def _n_groups(text: str) -> int | str:
    """--n_groups: a count, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def config_from_args(args) -> CompressConfig:
    names = CompressConfig.__dataclass_fields__
    vals = {k: getattr(args, k) for k in names}
    vals["use_mi_grouping"] = bool(args.use_mi_grouping)
    vals["true_sequential"] = bool(args.true_sequential)
    if args.grouping is None:  # with pruning the Hessian weighting measured worse (SmolLM2, 3 seeds: 52.8 vs 39.5)
        vals["grouping"] = "mi" if (args.sparsity > 0 or args.prunen) else "mi_hessian"
    if args.n_groups is None:  # auto where the budget counts the groups' metadata
        vals["n_groups"] = 0 if args.bits_budget == "stored" else 10
    elif args.n_groups == "auto":
        vals["n_groups"] = 0
    return CompressConfig(**vals)


# ---------------------------------------------------------------- devices
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


# ---------------------------------------------------------------- the run
class Console:
    """Receives the driver's events: prints their lines, writes them to the JSON log, counts
    the linears left under their bit target, and keeps the progress that an interrupt reports."""

    def __init__(self, jlog):
        self.jlog = jlog
        self.under = 0
        self.done = self.total = 0
        self.work: Path | None = None   # the checkpoint folder, while there is one
        self.saved: str | None = None   # the --save folder, once written

    def __call__(self, rec: dict) -> None:
        from events import format_line
        self.jlog.write(rec)
        if rec["event"] == "under_target":
            self.under += 1
            return
        if rec["event"] == "layer":
            self.done, self.total = rec["done"], rec["total"]
        elif rec["event"] == "resumed":
            self.done, self.total = rec["restored"], rec["total"]
        line = format_line(rec)
        if line is not None:
            print(line, flush=True)

    def interrupted(self) -> str:
        if self.saved:
            return f"interrupted during evaluation; the compressed model is saved in {self.saved}"
        if not self.total:
            return "interrupted before the first layer was compressed; nothing was written"
        where = f"interrupted after layer {self.done} of {self.total}"
        if self.work is not None:
            return f"{where}; rerun the same command with --resume (checkpoints in {self.work})"
        return f"{where}; nothing was kept (--save or --work_dir make a run resumable)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from events import JsonLog
    console = Console(JsonLog(None))
    try:
        return run(args, console)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf in a layer: the message names it and what to try
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(console.interrupted(), file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # data errors are user errors too
        from datautils import DataError
        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            cap = f" under --max_gpu_memory {args.max_gpu_memory}" if args.max_gpu_memory else ""
            print(f"error: the GPU ran out of memory{cap} ({str(e).splitlines()[0][:160]}); pass --max_gpu_memory "
                  "below the free memory so that the activations go to host memory, or lower --fwd_batch or "
                  "--nsamples", file=sys.stderr)
            return 1
        raise
    finally:
        console.jlog.close()


def run(args, console: Console) -> int:
    validate(args)
    if DEFAULT_GPUS is not None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", DEFAULT_GPUS)
    from datautils import check_dataset, ensure_available
    from model_io import checkpoint_dtype, load_config
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
    if cfg.mixed and cfg.n_groups > width:
        print(f"warning: --n_groups {args.n_groups} exceeds the {width} input channels of the smallest "
              f"linear; capped per linear", file=sys.stderr)

    import numpy as np
    import torch
    from checkpoint import Checkpointer, run_fingerprint, work_folder
    devs = pick_devices(args.device)
    named = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    dtype = named.get(args.dtype, torch.float16 if devs[0].type == "cuda" else torch.float32)
    # what the saved weights are: --dtype, or the dtype computed in, except that a CPU run computes
    # in float32 and saves in the checkpoint's own dtype
    save_dtype = checkpoint_dtype(model_cfg) if args.dtype == "auto" and dtype == torch.float32 else dtype
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    warnings.simplefilter("always", UserWarning)
    folder = work_folder(args) if cfg.compresses else None
    checkpoint = Checkpointer(folder, run_fingerprint(cfg, args, dtype, len(devs)), args.resume) if folder else None
    # every dataset the run needs is at hand (hub splits downloaded) before the model is loaded
    if cfg.calibrates:
        ensure_available(args.dataset, "calibration")
    for e in evals:
        ensure_available(e, "evaluation")
    if not sys.stderr.isatty():  # logs to a file or pipe: no carriage-return bars (loading, writing, downloads)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()

    from events import JsonLog
    from model_io import ARCHS, load_tokenizer
    spec = ARCHS[model_cfg.model_type]
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if args.max_gpu_memory:
        for d in devs:  # the cap is enforced: the allocator frees its cache and retries before going past it
            if d.type == "cuda":
                total = torch.cuda.get_device_properties(d).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_gpu_memory * 2 ** 30 / total), d)
    model, files = load(args, model_cfg, spec, dtype, devs)
    console.jlog = jlog = JsonLog(args.log_json)  # a no-op without --log_json
    jlog.event("start", model=args.model, dataset=args.dataset, config=vars(args))

    from streaming import LayerStore, SaveWriter
    writer = None
    if args.save:
        packed = None if args.save_format == "fake" else {"nm": (cfg.prunen, cfg.prunem), "pruned": cfg.prunes}
        writer = SaveWriter(args.save, model_cfg.num_hidden_layers, spec, save_dtype, packed, args.overwrite)
    store = LayerStore(model, spec, dtype, files, writer, save_dtype)
    try:
        summary, seconds, reports = compress(args, cfg, model, spec, tokenizer, devs, dtype, checkpoint, console,
                                             store)
        from events import versions
        report = {"config": vars(args), "versions": versions(), **summary, "ppl": {}, "seconds": seconds,
                  "saved_dtype": str(save_dtype).replace("torch.", ""),
                  "linears": {k: v.to_json() for k, v in reports.items()}}
        if evals:  # the embeddings and head, parked while the layers were compressed (streamed runs)
            store.restore_outer()
        if save_dtype != dtype:  # evaluate exactly the saved weights (streamed layers come back from the save)
            model.to(save_dtype).to(dtype)
        if writer is not None:
            save(args, store, tokenizer, report, jlog)
            console.saved = args.save
            if checkpoint is not None:  # the saved folder holds the result now
                checkpoint.finish()
    finally:
        if writer is not None:
            writer.abort()  # a run that did not finish its save leaves no temporary folder

    from datautils import get_eval_tokens
    from layerwise import perplexity
    from model_io import write_report
    for name in evals:
        tokens = get_eval_tokens(name, tokenizer, args.seqlen)
        report["ppl"][name] = ppl = perplexity(model, spec, tokens, args.seqlen, devs, dtype, args.eval_windows,
                                               args.fwd_batch, store, args.max_gpu_memory)
        print(f"{name} ppl {ppl:.3f}", flush=True)
        jlog.event("eval", dataset=name, ppl=ppl)
        if args.save:
            write_report(args.save, report)
    if checkpoint is not None and not args.save:  # evaluated: the checkpoints have served
        checkpoint.finish()
    jlog.event("done", ppl=report["ppl"])
    return 0


def load(args, model_cfg, spec, dtype, devs):
    """(model, files): a streamed skeleton and its safetensors files where the checkpoint allows
    (streaming.py), else the whole model in host memory and None."""
    from model_io import load_model
    from streaming import StreamError, TensorFiles, bound_host_memory, load_skeleton, local_checkpoint
    where = f"{args.model} ({model_cfg.model_type}, {model_cfg.num_hidden_layers} layers)"
    compute = f"compressing on {', '.join(map(str, devs))}"
    folder = None if args.no_stream else local_checkpoint(args.model, dtype)
    if folder is not None:
        files = TensorFiles(folder)
        try:
            model = load_skeleton(folder, files, dtype, spec, args.trust_remote_code, head=False)
            print(f"streaming {where} from {folder}: one decoder layer at a time in {dtype}; {compute}", flush=True)
            bound_host_memory()
            return model, files
        except StreamError as e:
            print(f"note: {e}; loading the whole model instead", flush=True)
    print(f"loading {where} as {dtype} on the CPU; {compute}", flush=True)
    return load_model(args.model, dtype, args.trust_remote_code), None


def compress(args, cfg: CompressConfig, model, spec, tokenizer, devs, dtype, checkpoint, console: Console, store):
    """The compression step of the run: (summary, seconds, reports). Without pruning or
    quantization flags there is nothing to do and the model is only evaluated."""
    from compress import StageTimer, compress_model
    from datautils import get_loaders
    from events import summarize
    if not cfg.compresses:
        print("no pruning or quantization requested (--sparsity, --prunen/--prunem, --wbits): "
              "evaluating the model as it is", flush=True)
        return {"avg_bits": 16.0, "effective_bits": 16.0, "sparsity": 0.0, "bits_histogram": {"16": 1.0}}, 0.0, {}
    console.work = checkpoint.folder if checkpoint is not None else None
    t0 = time.perf_counter()
    windows = get_loaders(args.dataset, tokenizer, args.nsamples, args.seed, args.seqlen) if cfg.calibrates else []
    timer = StageTimer(devs, enabled=args.profile)
    result = compress_model(model, spec, cfg, windows, devs, dtype, console, args.fwd_batch, timer=timer,
                            keep_mi=bool(args.plot), checkpoint=checkpoint, store=store,
                            max_gpu_memory=args.max_gpu_memory, restore_outer=False, keep_qparams=False)
    seconds = time.perf_counter() - t0
    summary = summarize(result.reports)
    if args.profile:
        summary["stage_seconds"] = dict(timer.seconds)
        print("stages (s, all layers): " + "  ".join(f"{k} {v:.2f}" for k, v in timer.seconds.items()) +
              f"  (sum {sum(timer.seconds.values()):.2f} of {seconds:.2f}; the rest: calibration windows read and captured)", flush=True)
    print(f"compressed in {seconds:.1f}s: sparsity {summary['sparsity']:.3f}  avg bits {summary['avg_bits']:.3f}  "
          f"effective bits {summary['effective_bits']:.3f}  stored bits {summary['stored_bits']:.3f}", flush=True)
    print("bit distribution (fraction of weights): " +
          "  ".join(f"{b}b {f:.3f}" for b, f in summary["bits_histogram"].items()), flush=True)
    if console.under:
        print(f"warning: {console.under} of {len(result.reports)} linears ended more than 0.01 {cfg.bits_budget} "
              f"bits under --target_avg_bits {cfg.target_avg_bits} (their least-error widths average less; each "
              "linear's bits are in the report and --log_json)", flush=True)
    console.jlog.event("compressed", seconds=seconds, under_target=console.under, **summary)
    if args.plot:
        import plots
        for path in plots.write_plots(args.plot, result.reports, result.mi, spec.layers, spec.groups[0]):
            print(f"plot {path}", flush=True)
    return summary, seconds, result.reports


def save(args, store, tokenizer, report: dict, jlog) -> None:
    """Finish --save: the layers not written yet (none, unless nothing was compressed), the rest
    of the model, the index, tokenizer and report, renamed into place (streaming.SaveWriter)."""
    store.flush()
    store.writer.finish(store.model, tokenizer, report, outer=store.outer_pieces if store.streamed else None)
    if "disk" in report:
        import packing
        print(packing.describe_disk(report["disk"]), flush=True)
    print(f"saved to {args.save}", flush=True)
    jlog.event("saved", folder=args.save, format=args.save_format, disk=report.get("disk"))


if __name__ == "__main__":
    sys.exit(main())
