"""Copies between host memory and a GPU that run beside the GPU's own work.

A plain `tensor.to("cuda")` from pageable host memory (a memory-mapped safetensors file, a
fresh CPU tensor), or `tensor.to("cpu")` into it, runs on the device's default stream, where
the compression's kernels run: the kernels queued after the copy wait for all of it. The layer
files read ahead and written behind on a worker thread (streaming.LayerStore.background) then
stall the work they are meant to hide behind: at 70B, ~1.7 GB each way per layer.

Inside a `side_copies()` block, this thread's copies instead go through two small pinned
staging buffers per device, on a CUDA stream of their own: the thread fills one buffer while
the other is in flight, and the default stream never waits. Leaving the block waits for the
copies started in it, so the tensors it produced are ready for any stream.

    with side_copies():                       # on the worker thread
        w = to_device(cpu_tensor, "cuda:0")   # a new tensor on the GPU
        w = file_to_device(f, offset, shape, torch.bfloat16, torch.float16, "cuda:0")  # from a file
        for piece in host_pieces(gpu_tensor, torch.float16):
            f.write(piece.numpy())            # its elements in order, in pieces on the host

Outside such a block, and for CPU devices, the same calls make plain copies."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

CHUNK_BYTES = 16 << 20  # per staging buffer (two per device and thread)

_local = threading.local()  # .depth: side_copies blocks open; .stagers: device -> _Stager (kept)


class _Stager:
    """One thread's staging buffers and copy stream for one CUDA device."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.stream = torch.cuda.Stream(dev)
        self.compute = torch.cuda.default_stream(dev)
        self.bufs = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done: list[torch.cuda.Event | None] = [None, None]  # buffer k's last copy
        self.k = 0

    def _buffer(self) -> torch.Tensor:
        """The other staging buffer, once its last copy has finished."""
        self.k ^= 1
        if self.done[self.k] is not None:
            self.done[self.k].synchronize()
        return self.bufs[self.k]

    def _copied(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self.done[self.k] = ev
        return ev

    def _upload(self, dst: torch.Tensor, fill) -> None:
        """dst (device bytes) filled piece by piece: fill(buf, off) puts bytes [off, off + len(buf))
        into a staging buffer, which then goes to the device while the next one is filled. dst is
        allocated from the default stream's memory (this thread's current stream), where the block
        may still be read or written by queued kernels: the copies start after them."""
        self.stream.wait_stream(self.compute)
        for off in range(0, dst.numel(), CHUNK_BYTES):
            m = min(CHUNK_BYTES, dst.numel() - off)
            buf = self._buffer()[:m]
            fill(buf, off)
            with torch.cuda.stream(self.stream):
                dst[off:off + m].copy_(buf, non_blocking=True)
            self._copied()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        src = _flat_bytes(t.detach().contiguous())
        out = torch.empty(t.shape, dtype=t.dtype, device=self.dev)
        self._upload(_flat_bytes(out), lambda buf, off: buf.copy_(src[off:off + buf.numel()]))
        return out

    def from_file(self, f, offset: int, shape, src_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.dev)
        raw = out if src_dtype == dtype else torch.empty(shape, dtype=src_dtype, device=self.dev)
        f.seek(offset)
        self._upload(_flat_bytes(raw), lambda buf, off: read_exactly(f, buf))  # the file is read in order
        if raw is not out:  # cast on the device, on the copy stream; raw's memory is not reused before that
            with torch.cuda.stream(self.stream):
                out.copy_(raw)
            raw.record_stream(self.stream)
        return out

    def pieces(self, t: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        flat = t.detach().contiguous().reshape(-1)
        n, step = flat.numel(), CHUNK_BYTES // flat.element_size()
        self.stream.wait_stream(self.compute)  # t's values come from kernels queued there

        def start(off: int):
            m = min(step, n - off)
            host = self._buffer()[:m * flat.element_size()].view(flat.dtype)
            with torch.cuda.stream(self.stream):
                host.copy_(flat[off:off + m], non_blocking=True)
            return host, self._copied()

        ahead = start(0) if n else None
        for off in range(0, n, step):
            host, ev = ahead
            # the next piece into the other buffer (whose piece the caller is done with)
            ahead = start(off + step) if off + step < n else None
            ev.synchronize()
            yield host.to(dtype) if (host.is_floating_point() and dtype != host.dtype) else host


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def read_exactly(f, buf: torch.Tensor) -> None:
    """Fill the host tensor buf (bytes) from the binary file f's current position."""
    view, got = memoryview(buf.numpy()), 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise EOFError(f"{getattr(f, 'name', 'the file')} ends inside a tensor")
        got += k


def _stager(dev) -> _Stager | None:
    """This thread's stager for dev inside a side_copies block; None elsewhere or for non-CUDA."""
    dev = torch.device(dev)
    if dev.type != "cuda" or not getattr(_local, "depth", 0):
        return None
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    stagers = _local.__dict__.setdefault("stagers", {})
    if dev not in stagers:
        stagers[dev] = _Stager(dev)
    return stagers[dev]


@contextmanager
def side_copies():
    """This thread's copies to and from CUDA devices go through staging buffers on a side stream
    until the block ends; the end waits for them."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if not _local.depth:
            for s in getattr(_local, "stagers", {}).values():
                s.stream.synchronize()


def staged(dev) -> bool:
    """Whether copies to or from dev would go through the side stream here."""
    return _stager(dev) is not None


def to_device(t: torch.Tensor, dev) -> torch.Tensor:
    """t (on the host) on dev: staged inside side_copies, else t.to(dev)."""
    s = _stager(dev)
    return t.to(dev) if s is None or t.device.type != "cpu" else s.to_device(t)


def file_to_device(f, offset: int, shape, src_dtype: torch.dtype, dtype: torch.dtype, dev) -> torch.Tensor:
    """A tensor stored at byte `offset` of the open binary file f (shape, src_dtype, contiguous)
    on dev in dtype, read in pieces straight into the staging buffers (no host tensor, no mapping
    of the file). Only inside side_copies, for a CUDA dev (see staged)."""
    s = _stager(dev)
    if s is None:
        raise RuntimeError("file_to_device needs a side_copies block and a CUDA device")
    return s.from_file(f, offset, shape, src_dtype, dtype)


def host_pieces(t: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """t's elements in order as contiguous 1-D host tensors, floating ones cast to dtype: staged
    pieces of CHUNK_BYTES inside side_copies (each valid until the next is asked for), else one
    piece. Casts are made on the host."""
    s = _stager(t.device)
    if s is not None:
        yield from s.pieces(t, dtype)
        return
    host = t.detach().to("cpu")
    yield (host.to(dtype) if host.is_floating_point() else host).contiguous().reshape(-1)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t on the host (a new tensor where t is on a GPU; t itself where it is on the CPU)."""
    s = _stager(t.device)
    if s is None:
        return t.to("cpu")
    out = torch.empty(t.shape, dtype=t.dtype)
    flat, off = out.reshape(-1), 0
    for piece in s.pieces(t, t.dtype):
        flat[off:off + piece.numel()].copy_(piece)
        off += piece.numel()
    return out
