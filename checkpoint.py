"""Per-layer checkpoints of a compression run (--resume), and what must match to resume one.

A work folder (--work_dir, or SAVE.work beside --save) holds, each file written atomically
(temporary file in the folder, fsync, os.replace):

    fingerprint.json    the run's configuration (run_fingerprint); a resume must match it
    layer_0007.pt       layer 7's compressed parameters, its LinearReports (qparams
                        included) and, for layer 0 with --plot, the MI matrix
    acts_0007.safetensors  the calibration activations leaving layer 7, one tensor "acts"
                        (only the latest is kept; older ones are deleted once it is safely
                        on disk); written and read a batch of windows at a time, so the host
                        never holds them whole when they live on the GPU

The layer files are plain dicts, lists and tensors, read back with torch.load(weights_only=True).
Layers 0..k count as done when all their layer files and acts_k exist.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from dataclasses import asdict, fields
from pathlib import Path

import torch

from config import CompressConfig, LinearReport, UsageError

ACTS_CHUNK = 8  # windows per piece of an activation file written or read


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

    def restore(self, store, inps: torch.Tensor | None, emit):
        """Begin, then hand the layers an interrupted run finished to the store (into the model,
        or to the save: streaming.LayerStore.finish) and, where compression continues, load the
        activations after the last of them into inps (None: the run needs no activations).
        Returns (index of the first layer to compress, compress.Compression with the restored
        reports and layer 0's MI matrix)."""
        from compress import Compression
        self.begin(emit)
        n = len(store)
        first = min(self.load_done(with_activations=inps is not None), n)
        result = Compression({})
        for i in range(first):
            state, reps, extra = self.load_layer(i)
            store.finish(i, state, reps)
            result.reports.update({f"{store.spec.layers}.{i}.{name}": r for name, r in reps.items()})
            if result.mi is None and "mi" in extra:
                result.mi = extra["mi"]
            del state
        if first and first < n and inps is not None:
            self.load_activations(first - 1, inps)
        if first:
            emit({"event": "resumed", "folder": str(self.folder), "restored": first, "total": n})
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
            while done and not (self.folder / self.acts_name(done - 1)).exists():
                done -= 1
        return done

    def load_layer(self, i: int):
        """(state_dict, {linear name: LinearReport}, extra) of layer i."""
        d = torch.load(self.folder / f"layer_{i:04d}.pt", map_location="cpu", weights_only=True)
        return d["state"], {n: LinearReport(**r) for n, r in d["reports"].items()}, d.get("extra") or {}

    @staticmethod
    def acts_name(i: int) -> str:
        return f"acts_{i:04d}.safetensors"

    def load_activations(self, i: int, inps: torch.Tensor) -> None:
        """The activations leaving layer i, copied into inps (on any device) a piece at a time."""
        from safetensors import safe_open
        with safe_open(str(self.folder / self.acts_name(i)), framework="pt") as f:
            saved = f.get_slice("acts")
            shape = tuple(saved.get_shape())
            if shape != tuple(inps.shape):
                raise UsageError(f"the activations in {self.folder} have shape {shape}, "
                                 f"this run needs {tuple(inps.shape)}; rerun without --resume")
            for w0 in range(0, shape[0], ACTS_CHUNK):
                inps[w0:w0 + ACTS_CHUNK].copy_(saved[w0:w0 + ACTS_CHUNK])

    def save_layer(self, i: int, layer, reports: dict[str, LinearReport], shares: list | None,
                   extra: dict | None = None) -> None:
        """Layer i's parameters and reports and, when given, the activations leaving it (the
        devices' shares of the windows, in window order)."""
        payload = {"state": {k: v.detach().to("cpu").clone() for k, v in layer.state_dict().items()},  # own storage
                   "reports": {n: {f.name: getattr(r, f.name) for f in fields(LinearReport)} for n, r in reports.items()},
                   "extra": extra}
        self._write(f"layer_{i:04d}.pt", functools.partial(torch.save, payload))
        del payload  # before the activations: the host holds one of them at a time
        if shares is not None:
            self._write(self.acts_name(i), lambda f: write_tensor_pieces(f, "acts", shares))
            for old in self.folder.glob("acts_*"):
                if old.name != self.acts_name(i):
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


def write_tensor_pieces(f, name: str, parts: list[torch.Tensor]) -> None:
    """A safetensors file holding one tensor, the concatenation of parts along dim 0, written
    ACTS_CHUNK rows at a time (each piece copied to the host only while it is written). The
    format is safetensors' own: an 8-byte little-endian header length, the JSON header, the
    raw little-endian bytes."""
    code = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[parts[0].dtype]
    shape = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]]
    nbytes = sum(p.numel() for p in parts) * parts[0].element_size()
    header = json.dumps({name: {"dtype": code, "shape": shape, "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(header)) + header)
    for p in parts:
        for r0 in range(0, p.shape[0], ACTS_CHUNK):
            f.write(p[r0:r0 + ACTS_CHUNK].detach().to("cpu").contiguous().view(torch.uint8).numpy())
