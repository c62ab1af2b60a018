"""What a run tells people and machines: the driver's event records, their one-line text for
the console, the JSON-lines log (--log_json) and the figures of the report.

An event is a plain dict with "event" naming its kind and the figures as fields, e.g.
{"event": "linear", "layer": 3, "linear": "self_attn.q_proj", "loss": 0.012, "sparsity": 0.5,
"bits": 3.5, "seconds": 0.8}. The console line and the JSON line are both made from it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path


# ---------------------------------------------------------------- console lines
def format_line(rec: dict) -> str | None:
    """The console line of an event; None for events that are only counted (under_target) or
    only machine-readable."""
    kind = rec["event"]
    if kind == "linear":
        loss = rec.get("loss")
        parts = [f"layer {rec['layer']} {rec['linear']}"]
        if loss is not None and math.isfinite(loss):
            parts.append(f"loss {loss:.3e}")
        parts += [f"sparsity {rec['sparsity']:.3f}", f"bits {rec['bits']:.2f}", f"{rec['seconds']:.1f}s"]
        return "  ".join(parts)
    if kind == "mi":
        return (f"layer {rec['layer']} {'/'.join(rec['linears'])}  MI mean {rec['mi_mean']:.4f}  "
                f"max {rec['mi_max']:.3f}  >0.1 {rec['mi_frac_above_0.1']:.3f}  groups {rec['groups']}  "
                f"grouping {rec['seconds']:.2f}s")
    if kind == "layer":
        line = f"layer {rec['layer']} done in {rec['seconds']:.1f}s  [{rec['done']}/{rec['total']}, eta {rec['eta']:.0f}s]"
        if "host_gib" in rec:
            line += f"  host {rec['host_gib']:.2f} GiB (peak {rec['host_peak_gib']:.2f})"
        if "gpu_peak_gib" in rec:
            line += f"  GPU peak {rec['gpu_peak_gib']:.2f} GiB"
        return line
    if kind == "resumed":
        return (f"resumed from {rec['folder']}: layers 0..{rec['restored'] - 1} restored, "
                f"{rec['total'] - rec['restored']} to go")
    if kind == "warning":
        return f"warning: {rec['text']}"
    if kind == "message":
        return rec["text"]
    return None


# ---------------------------------------------------------------- JSON lines
def _plain(v):
    """Finite JSON: NaN/inf become null; tensors and paths become lists and strings."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist"):
        return _plain(v.tolist())
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


class JsonLog:
    """One JSON object per line with "event" and "t" (seconds since start), flushed as
    written; does nothing without a path."""

    def __init__(self, path=None):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w", encoding="utf-8") if path else None
        self.t0 = time.perf_counter()

    def write(self, rec: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(_plain({"event": rec["event"], "t": round(time.perf_counter() - self.t0, 3),
                                        **{k: v for k, v in rec.items() if k != "event"}}), allow_nan=False) + "\n")
        self.f.flush()

    def event(self, event: str, **fields) -> None:
        self.write({"event": event, **fields})

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


# ---------------------------------------------------------------- report figures
def summarize(reports: dict) -> dict:
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
        "stored_bits": sum(r.stored_bits * r.shape[0] * r.shape[1] for r in reports.values()) / total,
        "sparsity": sum(r.sparsity * r.shape[0] * r.shape[1] for r in reports.values()) / total,
        "bits_histogram": {str(b): n / total for b, n in sorted(hist.items())},
    }


def versions() -> dict:
    """python, torch, transformers and the git commit of the tool (GIT_COMMIT where set: a copy
    whose git metadata is absent or stale names it so)."""
    import torch
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    v["commit"] = os.environ.get("GIT_COMMIT")
    if not v["commit"]:
        try:
            v["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                         capture_output=True, text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            v["commit"] = None
    return v
