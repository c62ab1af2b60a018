"""Scale: peak GPU memory and time of one decoder layer, uncapped and under --max_gpu_memory,
and the peak host memory of compressing a random model streamed from sharded safetensors.

    GIT_COMMIT=abc123 python -m bench.scale --out bench/results            # on a GPU machine
    python -m bench.scale --smoke --out /tmp/scale                          # the same code paths on the CPU

1. Layers (as bench/speed.py: random LLaMA-shaped weights, nsamples x 2048 random
   activations, compress.compress_layer then the in-place forward): 70B-shaped (8192/28672,
   8 KV heads) and 7B-shaped, SparseGPT 50% and 50% + MI 4.0 (10 groups), uncapped and under
   each --caps value, the cap enforced with torch.cuda.set_per_process_memory_fraction; where
   layerwise.offload_activations says the activations do not fit under it they live in pinned
   host memory, as the CLI does. Each stage's peak is recorded (the peak statistics are reset
   at every stage boundary), so the table says where the memory goes.
2. Model: a random 7B-shaped model of --model_layers layers (fewer where the deadline leaves
   no time; the result says how many) is written as one fp16 shard per layer with an index,
   then vicuna_mi.py compresses it (50% + MI 4.0, streamed, --no_checkpoint, no evaluation) in
   a child process that reports its own peak resident memory (VmHWM) and peak GPU memory.

Rows run in order of importance and stop before --deadline seconds; results are rewritten
after every row to scale-<device>-<date>.json and .md in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as vicuna_mi.py, before CUDA starts
import torch  # noqa: E402

from bench import speed
from compress import StageTimer

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (shape, method, cap GiB or None), most important first
    ("70b", "mi_50_t4.0_k10", None), ("70b", "sparsegpt_50", None),
    ("70b", "mi_50_t4.0_k10", 22.0), ("70b", "mi_50_t4.0_k10", 16.0),
    ("7b", "mi_50_t4.0_k10", None), ("7b", "sparsegpt_50", None), ("7b", "mi_50_t4.0_k10", 4.0),
    ("70b", "sparsegpt_50", 22.0), ("70b", "sparsegpt_50", 16.0), ("7b", "sparsegpt_50", 4.0),
    ("70b", "mi_50_t4.0_k10", 12.0),
]
LAYER_S = {"7b": 4.5, "70b": 14.0, "smoke": 4.5}  # seconds per layer of the whole-model row, files included (H200)
SMOKE_SHAPE = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2)
PEAK = ("import sys, time, torch, vicuna_mi; t = time.perf_counter(); rc = vicuna_mi.main(sys.argv[1:]); "
        "print('WALL', time.perf_counter() - t); "
        "print('GPU_PEAK', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0); "
        "print(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))); sys.exit(rc)")


class PeakTimer(StageTimer):
    """StageTimer that also records the peak GPU memory of each stage (the device's peak
    statistics are reset at every stage boundary; what runs between stages is kept too)."""

    def __init__(self, dev=None, enabled: bool = False):
        super().__init__(dev, enabled)
        self.peaks: dict[str, float] = {}
        self.outside = 0.0

    def _peak(self) -> float:
        cuda = [d for d in self.devs if d.type == "cuda"]
        return max((torch.cuda.max_memory_allocated(d) for d in cuda), default=0) / 2 ** 30

    def _reset(self) -> None:
        for d in self.devs:
            if d.type == "cuda":
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)

    def __call__(self, stage: str):
        return self._stage(stage)

    @contextmanager
    def _stage(self, stage: str):
        self.outside = max(self.outside, self._peak())
        self._reset()
        with super().__call__(stage):
            yield
        self._reset_after(stage)

    def _reset_after(self, stage: str) -> None:
        for d in self.devs:
            if d.type == "cuda":
                torch.cuda.synchronize(d)
        self.peaks[stage] = max(self.peaks.get(stage, 0.0), self._peak())
        self._reset()

    def peak_gib(self) -> float:
        return max([self.outside, self._peak(), *self.peaks.values()])


def build_model(folder: Path, layers: int, dev, shape: str) -> dict:
    """A random LLaMA-shaped fp16 model written one shard per layer (streaming.Shards) with a
    config, an index and a small tokenizer; returns its size."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from streaming import Shards
    from tests.conftest import make_tokenizer
    cfg = speed.llama_config(shape, layers=layers, vocab=32000)
    cfg.dtype = "float16"
    folder.mkdir(parents=True, exist_ok=True)
    shards = Shards(folder, "model", layers + 1)
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, device=dev, generator=gen) * 0.02).half().cpu()
    with torch.device("meta"):  # names and shapes only
        shapes = {k: v.shape for k, v in LlamaDecoderLayer(cfg, 0).state_dict().items()}
    for i in range(layers):
        state = {f"model.layers.{i}.{k}": rand(*shape) if len(shape) == 2 else torch.ones(shape, dtype=torch.float16)
                 for k, shape in shapes.items()}
        shards.write(i, state)
        del state
    shards.write(layers, {"model.embed_tokens.weight": rand(cfg.vocab_size, cfg.hidden_size),
                          "model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.float16),
                          "lm_head.weight": rand(cfg.vocab_size, cfg.hidden_size)})
    shards.write_index()
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    make_tokenizer(folder)
    return {"layers": layers, "shape": shape, "bytes": shards.nbytes()}


def model_row(layers: int, dev, shape: str, nsamples: int, seqlen: int, work: Path,
              runs: list[str] | None = None) -> dict:
    """Compress the random model streamed, in a child process per run; their peaks and times.
    `runs`: one spec per run, DEVICES[+one_pass][+profile] (e.g. cuda:0,cuda:1+one_pass; profile:
    the CLI's --profile, its stage seconds kept as stage_s); default: `dev`."""
    from tests.conftest import make_text
    tick = time.perf_counter()
    built = build_model(work / "model", layers, dev, shape)
    build_s = time.perf_counter() - tick
    calib = work / "calib.txt"
    calib.write_text(make_text(12000, 1))
    row = {"model": built, "build_s": build_s, "runs": []}
    for spec in runs or [str(dev)]:
        devices, *modes = spec.split("+")
        shutil.rmtree(work / "out", ignore_errors=True)  # the previous run's save
        args = [str(work / "model"), str(calib), "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0",
                "--n_groups", "10", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--eval", "none",
                "--save", str(work / "out"), "--no_checkpoint", "--device", devices]
        for mode in modes:
            if mode not in ("one_pass", "profile"):
                raise SystemExit(f"unknown mode {mode!r} in model run {spec!r} (DEVICES[+one_pass][+profile])")
            args += ["--true_sequential", "0"] if mode == "one_pass" else ["--profile"]
        row["runs"].append(model_run(args, work))
        print("model run:", {k: v for k, v in row["runs"][-1].items() if k not in ("layer_s", "error")}, flush=True)
    return row


def model_run(args: list[str], work: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout
    run = {"command": "vicuna_mi.py MODEL calib.txt " + " ".join(args[2:]), "returncode": proc.returncode}
    if proc.returncode != 0:
        run["error"] = (out + proc.stderr)[-3000:]
        return run
    lines = out.splitlines()
    run["wall_s"] = float(next(ln.split()[1] for ln in lines if ln.startswith("WALL")))
    run["gpu_peak_gib"] = int(next(ln.split()[1] for ln in lines if ln.startswith("GPU_PEAK"))) / 2 ** 30
    run["host_peak_gib"] = int(next(ln.split()[1] for ln in lines if ln.startswith("VmHWM"))) / 2 ** 20
    run["layer_s"] = [float(ln.split(" done in ")[1].split("s")[0]) for ln in lines if " done in " in ln]
    # the progress line's memory columns: host now and its peak so far, the GPU's peak so far
    mem = [re.search(r"host ([0-9.]+) GiB \(peak ([0-9.]+)\)(?:  GPU peak ([0-9.]+) GiB)?", ln)
           for ln in lines if " done in " in ln]
    run["layer_host_gib"] = [float(m.group(1)) for m in mem if m]
    run["layer_host_peak_gib"] = [float(m.group(2)) for m in mem if m]
    run["layer_gpu_peak_gib"] = [float(m.group(3)) for m in mem if m and m.group(3)]
    run["streamed"] = any(ln.startswith("streaming ") for ln in lines)
    stages = next((ln for ln in lines if ln.startswith("stages (s, all layers): ")), None)
    if stages:  # --profile: "stages (s, all layers): name 1.23  other name 4.56  (sum ...)"
        body = stages.split(": ", 1)[1].split("  (sum")[0]
        run["stage_s"] = {m.group(1): float(m.group(2)) for m in re.finditer(r"\s*(.+?) ([0-9.]+)(?=  |$)", body)}
    run["saved_bytes"] = sum(p.stat().st_size for p in (work / "out").glob("*.safetensors"))
    return run


def write(out: Path, stem: str, meta: dict, rows: list, model: dict | None) -> None:
    (out / f"{stem}.json").write_text(json.dumps({**meta, "layers": rows, "model": model}, indent=1))
    lines = [f"Machine {meta['machine']}, {meta['date']}, commit {meta['commit']}", f"`{meta['command']}`", "",
             "One decoder layer, random weights, "
             f"{rows[0]['nsamples'] if rows else '?'} x {rows[0]['seqlen'] if rows else '?'} calibration tokens. "
             "Cap: --max_gpu_memory, enforced with torch.cuda.set_per_process_memory_fraction; offloaded: the "
             "activations live in pinned host memory. Peak: torch.cuda.max_memory_allocated, the three largest "
             "stage peaks beside it. The benchmark's own copy of the original weights stays on the CPU (before this "
             "benchmark, bench/speed.py kept it on the GPU, inside its peaks: +1.6 GiB at 70B, +0.38 GiB at 7B).", "",
             "| shape | method | cap GiB | offloaded | total s | vs uncapped | peak GiB | stage peaks GiB |"
             " forward+hessian | mi | clustering | allocation | solve | forward outputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['cap_gib'] or '-'} | | error: "
                         f"{r['error'].splitlines()[-1][:120] if r['error'] else ''} | | | | | | | | | |")
            continue
        m = r["median"]
        base = next((b for b in rows if (b["shape"], b["method"], b["cap_gib"]) == (r["shape"], r["method"], None)
                     and "error" not in b), None)
        ratio = f"{m['total'] / base['median']['total']:.2f}x" if base and r["cap_gib"] else ""
        peaks = r["runs"][0].get("stage_peak_gib", {})
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"| {r['shape']} | {r['method']} | {r['cap_gib'] or '-'} | {'yes' if r['offloaded'] else 'no'} | "
                     f"{m['total']:.2f} | {ratio} | {m['peak_gib']:.2f} | {top} | " +
                     " | ".join(f"{m.get(k, 0.0):.2f}" for k in ("forward+hessian", "mi", "clustering", "allocation",
                                                                  "solve", "forward outputs")) + " |")
    if model:
        lines += ["", f"Whole random {model['model'].get('shape', '7b') if 'model' in model else ''}-shaped model streamed from sharded safetensors (50% + MI 4.0, 10 groups, --no_checkpoint, "
                  "no evaluation), in a child process:", ""]
        if "skipped" in model:
            lines.append(f"skipped: {model['skipped']}")
        else:
            b = model["model"]
            lines.append(f"{b['layers']} layers, {b['bytes'] / 2**30:.2f} GiB on disk (fp16), built in "
                         f"{model['build_s']:.0f} s; one child process per run:")
            for r in model["runs"]:
                if "error" in r:
                    lines.append(f"- `{r['command']}`: error (exit {r['returncode']}): `{r['error'][-500:]}`")
                    continue
                ls = sorted(r["layer_s"]) or [0.0]
                lines.append(f"- `{r['command']}`: streamed {r['streamed']}; peak host memory (VmHWM) "
                             f"{r['host_peak_gib']:.2f} GiB; peak GPU memory (first device) {r['gpu_peak_gib']:.2f} GiB; "
                             f"wall {r['wall_s']:.1f} s; layers {ls[0]:.2f}-{ls[-1]:.2f} s, median "
                             f"{ls[len(ls) // 2]:.2f} s, sum {sum(ls):.1f} s; saved {r['saved_bytes'] / 2**30:.2f} GiB")
                if r.get("layer_host_gib"):
                    h, hp, g = r["layer_host_gib"], r["layer_host_peak_gib"], r.get("layer_gpu_peak_gib") or [0.0]
                    lines.append(f"  - memory at the end of each layer: host (VmRSS) {h[0]:.2f} GiB after the first, "
                                 f"{h[-1]:.2f} after the last, {min(h):.2f}-{max(h):.2f}; peak so far (VmHWM) "
                                 f"{hp[0]:.2f} after the first, {hp[-1]:.2f} after the last; GPU peak so far "
                                 f"{g[0]:.2f} after the first, {g[-1]:.2f} after the last")
                if r.get("stage_s"):
                    st = r["stage_s"]
                    lines.append("  - stage seconds over all layers (--profile: the devices synchronized at each stage "
                                 "boundary): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()) +
                                 f"; sum {sum(st.values()):.1f} of the layers' {sum(r['layer_s']):.1f}")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--model_layers", type=int, default=16)
    p.add_argument("--deadline", type=float, default=240.0, help="seconds after which no new row starts")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the code paths")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--rows", nargs="+", default=None, metavar="SHAPE:METHOD:CAP",
                   help="only these layer rows, e.g. 70b:mi_50_t4.0_k10:16 (CAP - for none); default: all")
    p.add_argument("--no_model", action="store_true", help="skip the whole-model row")
    p.add_argument("--model_runs", nargs="+", default=None, metavar="DEVICES[+one_pass][+profile]",
                   help="compress the whole-model row once per spec, e.g. cuda:0 cuda:0,cuda:1+one_pass "
                        "(default: cuda:0, true-sequential); the model is built once")
    p.add_argument("--model_shape", default="7b", choices=["7b", "70b"], help="shape of the whole-model row's layers")
    args = p.parse_args()
    start = time.perf_counter()
    torch.set_grad_enabled(False)
    if args.smoke:
        speed.SHAPES["smoke"] = SMOKE_SHAPE
        dev, name = torch.device("cpu"), "cpu-smoke"
        rows_todo = [("smoke", m, c) for m in ("mi_50_t4.0_k10", "sparsegpt_50") for c in (None, 1e-3)]
        nsamples, model_shape, seqlen = 8, "smoke", 64
    else:
        dev = torch.device("cuda:0")
        torch.backends.cuda.matmul.allow_tf32 = False
        name = torch.cuda.get_device_name(dev).replace(" ", "-")
        rows_todo, nsamples, model_shape, seqlen = ROWS, args.nsamples, args.model_shape, 2048
    meta, out = speed.run_meta(name, args.out)
    stem = f"scale-{name}-{meta['date']}{args.tag}"
    if args.rows:
        rows_todo = [(sh, m, None if c == "-" else float(c)) for sh, m, c in (r.split(":") for r in args.rows)]
    rows: list = []
    model = {"skipped": "--no_model"} if args.no_model else None
    cost = {"70b": 16.0, "7b": 6.0, "smoke": 1.0}  # seconds a row takes, warm-up included (H200 estimates)
    per_layer = model_layer_s(args, model_shape)
    model_cost = 25.0 + per_layer * args.model_layers
    for shape, method, cap in rows_todo:
        left = args.deadline - (time.perf_counter() - start)
        if left < cost[shape] + (0 if model is not None else min(model_cost, 25.0 + per_layer * 4)):
            continue
        try:
            r = speed.time_layer(shape, method, nsamples, seqlen, 1, [dev], cap, PeakTimer)
        except Exception as e:  # an OOM under a cap is a result too
            r = {"shape": shape, "method": method, "cap_gib": cap, "error": f"{type(e).__name__}: {e}"}
            if dev.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, dev)
                torch.cuda.empty_cache()
        rows.append(r)
        m = r.get("median", {})
        print(f"{shape} {method} cap {cap}: " + (r["error"][:200] if "error" in r else
              f"total {m['total']:.2f}s peak {m['peak_gib']:.2f} GiB offloaded {r['offloaded']} "
              f"stages {r['runs'][0].get('stage_peak_gib')}"), flush=True)
        write(out, stem, meta, rows, model)
        # the model row goes once the 70B and 7B uncapped rows are in (it needs the most time)
        if model is None and shape == "7b" and method == "sparsegpt_50":
            model = run_model(args, start, dev, model_shape, nsamples, seqlen)
            write(out, stem, meta, rows, model)
    if model is None:
        model = run_model(args, start, dev, model_shape, nsamples, seqlen)
    write(out, stem, meta, rows, model)
    print(f"wrote {out / stem}.json/.md", flush=True)


def model_layer_s(args, shape: str) -> float:
    """Seconds the whole-model row takes per layer: LAYER_S once for each of its runs."""
    return LAYER_S[shape] * len(args.model_runs or [None])


def run_model(args, start: float, dev, shape: str, nsamples: int, seqlen: int) -> dict | None:
    left = args.deadline - (time.perf_counter() - start)
    layers = min(args.model_layers, int((left - 25.0) / model_layer_s(args, shape)))
    if layers < 2:
        return {"skipped": f"{left:.0f} s left before the deadline"}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_WORK")) as work:
        row = model_row(layers, dev, shape, nsamples, seqlen, Path(work), args.model_runs)
    return row


if __name__ == "__main__":
    main()
