"""Per-layer checkpoints of a compression run (--resume), and what must match to resume one.

A work folder (--work_dir, or SAVE.work beside --save) holds, each file written atomically
(temporary file in the folder, fsync, os.replace):

    fingerprint.json    the run's configuration (run_fingerprint); a resume must match it
    layer_0007.pt       layer 7's compressed parameters, its LinearReports (qparams
                        included) and, for layer 0 with --plot, the MI matrix
    acts_0007.pt        the calibration activations leaving layer 7 (only the latest is
                        kept; older ones are deleted once it is safely on disk)

Everything is plain dicts, lists and tensors, read back with torch.load(weights_only=True).
Layers 0..k count as done when all their layer files and acts_k exist.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch

from config import CompressConfig, LinearReport, UsageError
from model_io import ArchSpec, get_module


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


def _fingerprint_diff(old: dict, new: dict) -> str:
    def flat(d: dict) -> dict:
        return {**{k: v for k, v in d.items() if k != "config"}, **d.get("config", {})}
    a, b = flat(old), flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys[:4]) + \
        (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


class Checkpointer:
    """The work folder of one run: `restore` what an interrupted run finished, `save_layer`
    after each layer, `finish` once the result is safe."""

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

    def begin(self, emit) -> None:
        """Start of compression: without resume, clear a work folder an earlier run left; then
        make the folder and record the fingerprint."""
        if self.folder.exists() and not self.resume and any(self.folder.iterdir()):
            emit({"event": "message", "text": f"clearing the work folder {self.folder} left by an earlier run "
                                              "(pass --resume to continue it)"})
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp-*"):  # a write cut short by a crash
            stale.unlink()
        if not (self.folder / self.FINGERPRINT).exists():
            self._write(self.FINGERPRINT, lambda f: f.write(json.dumps(self.fingerprint, indent=1).encode()))

    def restore(self, model, spec: ArchSpec, inps: torch.Tensor | None, emit):
        """Begin, then load the layers an interrupted run finished into the model and, where
        compression continues, the activations after the last of them into inps (None: the
        run needs no activations). Returns (index of the first layer to compress,
        compress.Compression with the restored reports and layer 0's MI matrix)."""
        from compress import Compression
        self.begin(emit)
        layers = get_module(model, spec.layers)
        first = min(self.load_done(with_activations=inps is not None), len(layers))
        result = Compression({})
        for i in range(first):
            state, reps, extra = self.load_layer(i)
            layers[i].load_state_dict(state)
            result.reports.update({f"{spec.layers}.{i}.{n}": r for n, r in reps.items()})
            if result.mi is None and "mi" in extra:
                result.mi = extra["mi"]
        if first and first < len(layers) and inps is not None:
            saved = self.load_activations(first - 1)
            if saved.shape != inps.shape:
                raise UsageError(f"the activations in {self.folder} have shape {tuple(saved.shape)}, "
                                 f"this run needs {tuple(inps.shape)}; rerun without --resume")
            inps.copy_(saved)
            del saved
        if first:
            emit({"event": "resumed", "folder": str(self.folder), "restored": first, "total": len(layers)})
        elif self.resume:
            emit({"event": "message", "text": f"--resume: no finished layer in {self.folder}; starting from layer 0"})
        return first, result

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
        d = torch.load(self.folder / f"layer_{i:04d}.pt", map_location="cpu", weights_only=True)
        return d["state"], {n: LinearReport(**r) for n, r in d["reports"].items()}, d.get("extra") or {}

    def load_activations(self, i: int):
        return torch.load(self.folder / f"acts_{i:04d}.pt", map_location="cpu", weights_only=True)

    def save_layer(self, i: int, layer, reports: dict[str, LinearReport], inps, extra: dict | None = None) -> None:
        """Layer i's parameters and reports and, when given, the activations leaving it."""
        state = {k: v.detach().to("cpu").clone() for k, v in layer.state_dict().items()}  # clone: no shared storage
        reps = {n: {f.name: getattr(r, f.name) for f in fields(LinearReport)} for n, r in reports.items()}
        self._write(f"layer_{i:04d}.pt", lambda f: torch.save({"state": state, "reports": reps, "extra": extra}, f))
        if inps is not None:
            acts = inps.detach().to("cpu")
            self._write(f"acts_{i:04d}.pt", lambda f: torch.save(acts, f))
            for old in self.folder.glob("acts_*.pt"):
                if old.name != f"acts_{i:04d}.pt":
                    old.unlink()

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
