"""Weights streamed between disk and the decoder layers, one layer at a time, both ways.

A 70B model does not fit in the host memory of a small machine, and nothing needs it to: the
compression and the evaluation touch one decoder layer at a time (layerwise.stream_layers).
So for a local safetensors checkpoint (one file, or shards listed by
model.safetensors.index.json) the model is built as a skeleton on the meta device; only the
parts outside the decoder layers (embeddings, final norm, head, rotary tables) are read into
memory, and each layer's tensors are read from the files (memory-mapped, the file closed again
at once) when that layer is worked on and dropped back to meta afterwards. Each compressed
layer goes straight to the output (`SaveWriter`: one safetensors shard per layer plus an index,
the transformers layout; packed saves the same way), so host memory holds about two layers,
the embeddings and the calibration activations, whatever the model size.

    files = TensorFiles.find(folder)                 # None: no safetensors here (whole-model load)
    model = load_skeleton(folder, files, torch.float16, spec)
    store = LayerStore(model, spec, torch.float16, files=files, writer=SaveWriter(out, ...))
    compress_model(model, spec, cfg, windows, devs, dtype, store=store)   # each layer written when done
    store.writer.finish(model, tokenizer, report)                          # the rest, the index, renamed
    perplexity(model, spec, tokens, seqlen, devs, dtype, store=store)    # reads the saved layers

A .gguf file is converted once into such a checkpoint in the run's dtype (`gguf_checkpoint`, kept in
`cache_root()`) and streamed from there.

`LayerStore` is also what a model held whole in memory goes through (files None): then a layer
is moved to the device and back, as before streaming existed, and the writer, if any, still
gets each layer when it is done.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

import host_copy
from config import UsageError
from model_io import REPORT_FILE, ArchSpec, check_save_target, get_module

INDEX_SUFFIX = ".safetensors.index.json"


class StreamError(Exception):
    """The checkpoint cannot be streamed (a tensor the model needs is not in its files)."""


# ---------------------------------------------------------------- reading
class TensorFiles:
    """The tensors of a safetensors checkpoint in a folder (`stem`.safetensors, or shards
    listed by `stem`.safetensors.index.json), read by name on demand. Tensors are read from the
    files with plain reads, never memory-mapped: the touched pages of a mapped file count as the
    process's resident memory, so reading a tensor through a mapping holds it twice (the mapped
    pages and the copy) until the file is closed."""

    def __init__(self, folder: str | Path, stem: str = "model"):
        self.folder = Path(folder)
        index, single = self.folder / f"{stem}{INDEX_SUFFIX}", self.folder / f"{stem}.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.folder / f for k, f in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open
            with safe_open(str(single), framework="pt") as f:
                self.where = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {single.name} or {index.name} in {self.folder}")

    @classmethod
    def find(cls, folder: str | Path, stem: str = "model") -> "TensorFiles | None":
        """The checkpoint in folder, or None where it holds no safetensors checkpoint."""
        try:
            return cls(folder, stem)
        except FileNotFoundError:
            return None

    def read(self, names, convert=None) -> dict[str, torch.Tensor]:
        """Tensors by name, as stored, on the CPU, or each passed through `convert` (e.g. cast and
        moved to a GPU) as soon as it is read, so the host holds one of them at a time (each file
        opened once per call). Each is read into a fresh tensor (a dtype this reader does not
        know goes through safetensors)."""
        out = {}
        for k, f, path, start, _, shape, src in self._stored(names):
            if src is None:
                t = _read_with_safetensors(path, k)
            else:
                t = torch.empty(shape, dtype=src)
                f.seek(start)
                host_copy.read_exactly(f, t.reshape(-1).view(torch.uint8))
            out[k] = t if convert is None else convert(t)
            del t  # (converted) gone before the next is read
        return out

    def pieces(self, name: str, *dtypes: torch.dtype) -> Iterator[torch.Tensor]:
        """Tensor `name`'s elements in order as 1-D host tensors of up to host_copy.CHUNK_BYTES
        read from its file (no mapping: the host holds one piece, each valid until the next is
        asked for), floating ones cast through each of `dtypes` in turn."""
        def cast(t):
            for d in dtypes:
                t = t.to(d) if t.is_floating_point() else t
            return t
        for _, f, path, start, end, _, src in self._stored([name]):
            if src is None:  # a dtype this reader does not know: whole, through safetensors
                yield cast(_read_with_safetensors(path, name)).reshape(-1)
                return
            step = host_copy.CHUNK_BYTES - host_copy.CHUNK_BYTES % src.itemsize
            buf = torch.empty(min(step, end - start), dtype=torch.uint8)
            f.seek(start)
            for off in range(start, end, step):
                piece = buf[:min(step, end - off)]
                host_copy.read_exactly(f, piece)
                yield cast(piece.view(src))

    def _stored(self, names) -> Iterator[tuple]:
        """(name, open binary file, its path, start and end byte of the tensor's data, shape, dtype;
        None for a dtype this reader does not know) of each of `names`, each file opened once."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            if n not in self.where:
                raise StreamError(f"{n} is not in the safetensors files of {self.folder}")
            by_file[self.where[n]].append(n)
        for path, keys in by_file.items():
            with open(path, "rb", buffering=0) as f:
                header = _safetensors_header(f)
                base = f.tell()
                for k in keys:
                    e = header[k]
                    start, end = (base + o for o in e["data_offsets"])
                    yield k, f, path, start, end, e["shape"], _DTYPES_BY_NAME.get(e["dtype"])

    def read_to(self, names, dev, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors by name on dev, floating ones cast to dtype. Where host_copy stages copies to
        dev (the worker thread's read-ahead) the bytes go from the file through its pinned
        buffers to the device: no tensor in host memory and no mapped file pages, which would
        count as resident memory; the cast is made on the device. Else read(names, convert),
        cast on the host."""
        if not host_copy.staged(dev):
            return self.read(names, lambda v: to_device_as(v, dtype, dev))
        out = {}
        for k, f, path, start, _, shape, src in self._stored(names):
            if src is None:  # a dtype this reader does not know: through safetensors
                out[k] = to_device_as(_read_with_safetensors(path, k), dtype, dev)
            else:
                out[k] = host_copy.file_to_device(f, start, shape, src, dtype if src.is_floating_point else src, dev)
        return out


def to_device_as(v: torch.Tensor, dtype: torch.dtype, dev) -> torch.Tensor:
    """A host tensor on dev, cast to dtype on the host where floating (as from_pretrained casts);
    staged beside the device's work on the worker thread (host_copy)."""
    return host_copy.to_device(v.to(dtype) if v.is_floating_point() else v, dev)


def local_checkpoint(model: str, dtype: torch.dtype | None = None) -> Path | None:
    """The local folder holding `model`'s safetensors checkpoint: the folder itself, for a hub id
    its download (once, into the hub cache: configuration and safetensors files only), for a
    .gguf file its conversion to `dtype` (once, into the cache: `gguf_checkpoint`; without a
    dtype, None); None for a checkpoint without safetensors or a download or conversion that
    failed (the whole-model loader then says why)."""
    from model_io import model_location
    where, extra = model_location(model)
    if extra:  # gguf_file
        return None if dtype is None else gguf_checkpoint(Path(model).expanduser(), dtype)
    folder = Path(where)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # offline, gated, no such repository: the whole-model path reports it
            return None
    return folder if TensorFiles.find(folder) is not None else None


CACHE_ENV = "VICUNA_MI_CACHE"


def cache_root() -> Path:
    """Where converted checkpoints are kept: $VICUNA_MI_CACHE, else ~/.cache/vicuna_mi."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vicuna_mi").expanduser()


def gguf_checkpoint(path: Path, dtype: torch.dtype) -> Path | None:
    """A .gguf file as a safetensors checkpoint in `dtype` that the layers can be streamed from.
    Converted once per file (name, size, modification time) and dtype into
    cache_root()/gguf/: transformers' GGUF loader dequantizes the whole model in host memory
    this once (as the whole-model path does on every run), it is written as shards with
    config.json, and later runs stream it. In the run's dtype, so a streamed run computes on
    exactly the weights the whole-model path would load. None (with a note) if the conversion
    fails: the whole-model path then loads the file and reports why."""
    from model_io import load_model, load_tokenizer, save_model
    st = path.stat()
    folder = cache_root() / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-{str(dtype).split('.')[-1]}"

    def ready() -> bool:
        return (folder / "config.json").is_file() and TensorFiles.find(folder) is not None
    if ready():
        return folder
    print(f"converting {path} once to {dtype} safetensors in {folder} (this once the whole model is in "
          f"host memory; later runs stream it; ${CACHE_ENV} moves the cache)", flush=True)
    try:
        model = load_model(str(path), dtype, False)
        if folder.exists():  # an unreadable leftover of the same name
            shutil.rmtree(folder, ignore_errors=True)
        # the layout a run saves (one shard per layer, index, config, tokenizer), written to a
        # temporary folder and renamed into place: never a half-written cache entry
        save_model(model, load_tokenizer(str(path), False), str(folder), {"converted_from": str(path)}, False)
        del model
        release_host_memory()
    except Exception as e:  # noqa: BLE001 - the whole-model path loads the file again and raises the real error
        if ready():  # another run converted the same file meanwhile
            return folder
        print(f"note: could not convert {path.name} to safetensors ({str(e).splitlines()[0] if str(e) else e!r})",
              flush=True)
        return None
    return folder


def _tied_groups(model) -> list[list[str]]:
    """State-dict keys that name one tensor (tied weights), in state-dict order."""
    groups: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(v), []).append(k)
    return list(groups.values())


def _set_tensor(model, names: list[str], value: torch.Tensor) -> None:
    """Put value in place of the (meta) parameter or buffer every one of `names` refers to (tied
    names get one shared Parameter, as from_pretrained ties them)."""
    param = None
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            param = param if param is not None else torch.nn.Parameter(value, requires_grad=False)
            module._parameters[attr] = param
        else:
            module._buffers[attr] = value


def load_skeleton(folder: str | Path, files: TensorFiles, dtype: torch.dtype, spec: ArchSpec,
                  trust_remote_code: bool = False, head: bool = True):
    """The model with its decoder layers on the meta device and everything else read from
    `files` in `dtype` (as from_pretrained would cast it), in eval mode without a KV cache.
    head False: the output head stays meta too unless it is tied to the embeddings (compression
    never uses it; LayerStore.restore_outer reads it for an evaluation, a save copies it from the
    checkpoint: 0.5 GiB of host memory less at 70B while the calibration inputs are captured).
    Raises StreamError where a tensor the model needs is not in the files."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    inside = spec.layers + "."
    skip = () if head else (spec.head + ".",)
    read_outer(model, files, dtype, spec, folder, skip)
    if spec.rotary:  # non-persistent buffers (inv_freq) are computed, not stored: build them on the CPU
        rotary = get_module(model, spec.rotary)
        owner, _, attr = spec.rotary.rpartition(".")
        setattr(get_module(model, owner), attr, type(rotary)(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith((inside, *skip))]
    if left:
        raise StreamError(f"{left[0]} of {folder} could not be materialized outside the decoder layers")
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass
    model.config.use_cache = False
    model.eval()
    return model


def _outer_groups(model, spec: ArchSpec) -> list[list[str]]:
    """The tied-name groups of the state dict outside the decoder layers (embeddings, final norm, head)."""
    inside = spec.layers + "."
    return [names for names in _tied_groups(model) if not names[0].startswith(inside)]


def _read_group(files: TensorFiles, names: list[str], dtype: torch.dtype, folder="the checkpoint") -> torch.Tensor:
    """The tensor that the tied names `names` share, read from whichever of them `files` stores,
    cast to `dtype` where floating point (as from_pretrained would)."""
    stored = next((n for n in names if n in files.where), None)
    if stored is None:
        raise StreamError(f"{names[0]} is not in the safetensors files of {folder}")
    t = files.read([stored])[stored]
    return t.to(dtype) if t.is_floating_point() else t


def read_outer(model, files: TensorFiles, dtype: torch.dtype, spec: ArchSpec, folder="the checkpoint",
               skip: tuple[str, ...] = ()) -> None:
    """Read every tensor outside the decoder layers from `files` into the model (`_read_group`),
    but those whose every tied name starts with one of `skip`."""
    for names in _outer_groups(model, spec):
        if not (skip and all(n.startswith(skip) for n in names)):
            _set_tensor(model, names, _read_group(files, names, dtype, folder))


# ---------------------------------------------------------------- where each layer lives
class LayerStore:
    """Where each decoder layer's weights are between uses, and where finished layers go.

    files None: the model is whole in host memory; `load` moves a layer to the device and
    `unload` back to the CPU. files given: the layers are meta; `load` reads layer i from the
    checkpoint files (or, once it is compressed, from the writer's output, or from `kept` where
    there is no writer) and `unload` drops it back to meta. `finish` hands a compressed layer to
    the writer (saved in `save_dtype`); a streamed layer read back later is that saved copy cast
    to `dtype`, exactly what the whole-model path evaluates after its save-dtype round trip."""

    def __init__(self, model, spec: ArchSpec, dtype: torch.dtype | None = None, files: TensorFiles | None = None,
                 writer: "SaveWriter | None" = None, save_dtype: torch.dtype | None = None):
        self.model, self.spec, self.files, self.writer = model, spec, files, writer
        self.layers = get_module(model, spec.layers)
        self.dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.save_dtype = save_dtype or self.dtype
        self.kept: dict[int, dict[str, torch.Tensor]] = {}  # streamed without a writer: finished layers
        # background: layer files are read ahead and written behind on one worker thread while the
        # device computes (compress_model turns it on; see there); _writing: (layer, Future) in flight
        self.background = False
        self._pool: ThreadPoolExecutor | None = None
        self._writing: tuple[int, Future] | None = None

    @property
    def streamed(self) -> bool:
        return self.files is not None

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, i: int, dev) -> torch.nn.Module:
        """Layer i with real weights on dev."""
        if self._writing is not None and self._writing[0] == i:
            self.wait_written()
        return self._load(i, dev)

    def _load(self, i: int, dev) -> torch.nn.Module:
        layer = self.layers[i]
        if not self.streamed:
            return layer.to(dev)
        if self.writer is not None and i in self.writer.written:
            state = {k: to_device_as(v, self.dtype, dev) for k, v in self.writer.read_layer(i).items()}
        elif i in self.kept:
            state = {k: to_device_as(v, self.dtype, dev) for k, v in self.kept[i].items()}
        else:  # from the checkpoint, tensor by tensor to the device
            prefix = f"{self.spec.layers}.{i}."
            state = {k[len(prefix):]: v for k, v in self.files.read_to([prefix + k for k in layer.state_dict()],
                                                                         dev, self.dtype).items()}
        layer.load_state_dict(state, assign=True)
        left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if left:  # a non-persistent buffer inside the layer: its value is in no file
            raise StreamError(f"layer {i}'s {left[0]} is not stored in the checkpoint; run with --no_stream")
        return layer

    def park_outer(self) -> None:
        """Streamed: drop the embeddings, final norm and head to meta while the layers are worked
        on (they hold 0.5 GiB of host memory at 7B, more than one 7B layer; only the capture of the
        first layer's inputs, the evaluation and the save need them). Nothing for a whole model."""
        if not self.streamed:
            return
        state = self.model.state_dict(keep_vars=True)
        for names in _outer_groups(self.model, self.spec):
            _set_tensor(self.model, names, torch.empty_like(state[names[0]], device="meta"))
        release_host_memory()

    def restore_outer(self) -> None:
        """Undo park_outer: the parts outside the layers read back from the checkpoint files."""
        if not self.streamed:
            return
        state = self.model.state_dict(keep_vars=True)
        if any(state[names[0]].is_meta for names in _outer_groups(self.model, self.spec)):
            read_outer(self.model, self.files, self.dtype, self.spec)

    def outer_pieces(self, name: str, dtype: torch.dtype):
        """One tensor outside the layers (any of its tied names) as restore_outer would hold it (in
        the run's dtype), then cast to `dtype`: its elements in order, read from the checkpoint in
        pieces (TensorFiles.pieces), for a save that writes them without holding them (the
        embeddings and head are 0.25 GiB each at 7B)."""
        names = next(g for g in _outer_groups(self.model, self.spec) if name in g)
        stored = next((n for n in names if n in self.files.where), None)
        if stored is None:
            raise StreamError(f"{names[0]} is not in the safetensors files of the checkpoint")
        return self.files.pieces(stored, self.dtype, dtype)

    def unload(self, i: int, layer: torch.nn.Module) -> None:
        """Done with layer i for now: back to the CPU, or (streamed) back to meta, its host memory
        handed back to the system."""
        layer.to("meta" if self.streamed else "cpu")
        if self.streamed:
            release_host_memory()

    def finish(self, i: int, layer_or_state, reports: dict | None = None) -> None:
        """Layer i holds its final (compressed) weights: a module, or a state dict restored from a
        checkpoint. reports: its LinearReports (keyed relative to the layer), for packed saves."""
        state = layer_or_state if isinstance(layer_or_state, dict) else layer_or_state.state_dict()
        if not self.streamed and isinstance(layer_or_state, dict):
            self.layers[i].load_state_dict(state)
        if self.writer is not None:
            if self.background:  # written behind: the state's tensors stay alive until then
                self.wait_written()  # one layer in flight at most
                self._writing = (i, self._worker().submit(_beside, self.writer.write_layer, i, state, reports))
            else:
                self.writer.write_layer(i, state, reports)
        elif self.streamed:
            self.kept[i] = {k: v.to("cpu").to(self.save_dtype) for k, v in state.items()}

    def load_ahead(self, i: int, dev) -> Future | None:
        """background on: start loading layer i onto dev on the worker thread (after any write in
        flight, which it may need) and return its Future; else (or past the last layer) None."""
        if not self.background or i >= len(self):
            return None
        # the worker runs its tasks in order, so a write queued before this read is done by then
        return self._worker().submit(_beside, self._load, i, dev)

    def wait_written(self) -> None:
        """Wait for the layer being written behind, re-raising the writer's error."""
        if self._writing is not None:
            _, done = self._writing
            self._writing = None
            done.result()

    def close(self) -> None:
        """Wait for the worker's writes and stop it."""
        try:
            self.wait_written()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-files")
        return self._pool

    def flush(self) -> None:
        """Write every layer the writer has not had yet (a run that compressed nothing)."""
        self.wait_written()
        for i in range(len(self)):
            if self.writer is not None and i not in self.writer.written:
                layer = self.load(i, "cpu")
                try:
                    self.finish(i, layer)
                finally:
                    self.unload(i, layer)
        self.wait_written()  # all in the folder before the caller finishes it


def _beside(fn, *args):
    """fn(*args) on the worker thread, its copies to and from GPUs on a side stream (host_copy),
    so that they do not hold up the kernels of the layer being compressed; done when it returns."""
    with host_copy.side_copies():
        return fn(*args)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bound_host_memory(threshold: int = 1 << 20) -> None:
    """Have malloc give every buffer of `threshold` bytes or more its own mapping, returned to
    the system when it is freed (glibc; a no-op elsewhere). By default glibc raises this
    threshold up to 32 MiB once such a buffer has been freed, after which layer-sized buffers
    come from its heap, which fragments as one layer follows another: the resident memory of
    a streamed run then crept up by a few MB per layer even with `release_host_memory`
    (measured: 16 layers of 27 MB, 550 -> 650 MB; with this, 532 -> 541 MB). Process-wide:
    the CLI sets it when it streams."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def release_host_memory() -> None:
    """Return the host memory freed since the last call to the system (glibc's malloc_trim; a
    no-op elsewhere). Tensors of a few MB are carved from malloc's heap, and a heap fragmented
    by one layer's buffers after another keeps growing although what is live does not: without
    this, a streamed run's resident memory grew by about a layer per layer."""
    if _libc() is not None:
        _libc().malloc_trim(0)


def host_memory_gib() -> dict[str, float]:
    """This process's resident host memory now and at its peak (Linux's VmRSS and VmHWM), in GiB;
    empty where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return {}
    return {"host_gib": int(fields["VmRSS"].split()[0]) / 2 ** 20, "host_peak_gib": int(fields["VmHWM"].split()[0]) / 2 ** 20}


@functools.cache
def _libc():
    import ctypes
    import ctypes.util
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


# ---------------------------------------------------------------- writing
class Shards:
    """Numbered safetensors shards in one folder (`stem`-00001-of-000NN.safetensors, transformers'
    naming) and the index that maps each tensor to its shard."""

    def __init__(self, folder: Path, stem: str, count: int):
        self.folder, self.stem, self.count = folder, stem, count
        self.weight_map: dict[str, str] = {}

    def name(self, k: int) -> str:
        return f"{self.stem}-{k + 1:05d}-of-{self.count:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None, load=None) -> None:
        """Shard k holds `tensors` (on any device; floating ones cast to `dtype` where given),
        written one tensor at a time (write_safetensors; `load` as there)."""
        write_safetensors(self.folder / self.name(k), tensors, dtype, {"format": "pt"}, load)
        self.weight_map.update({t: self.name(k) for t in tensors})

    def read(self, k: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        with safe_open(str(self.folder / self.name(k)), framework="pt") as f:
            return {t: f.get_tensor(t) for t in f.keys()}

    def nbytes(self) -> int:
        return sum((self.folder / n).stat().st_size for n in set(self.weight_map.values()))

    def write_index(self, metadata: dict | None = None) -> None:
        """The index; its metadata holds total_size (the shards' bytes) and anything given."""
        meta = {"total_size": self.nbytes(), **(metadata or {})}
        (self.folder / f"{self.stem}{INDEX_SUFFIX}").write_text(
            json.dumps({"metadata": meta, "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))


class SaveWriter:
    """The --save folder, written one decoder layer at a time into a temporary folder beside it
    (so a failed run never leaves a half-written folder) and renamed into place by `finish`.

    Dense ("fake") saves: model-000NN-of-000MM.safetensors, one shard per decoder layer and a
    last one for everything else, and model.safetensors.index.json: what save_pretrained
    writes for a sharded model, so AutoModelForCausalLM.from_pretrained loads it. Packed saves:
    packed-000NN-of-000MM.safetensors the same way and packed.safetensors.index.json, whose
    metadata holds the packing header (packing.py), plus the GPTQ-layout copy in gptq/ where
    the quantization allows one. Tensors are stored in `save_dtype`."""

    def __init__(self, out_dir: str | Path, n_layers: int, spec: ArchSpec, save_dtype: torch.dtype,
                 packed: dict | None = None, overwrite: bool = False):
        import packing
        self.out = Path(out_dir).expanduser().resolve()
        self.n_layers, self.spec, self.save_dtype, self.overwrite = n_layers, spec, save_dtype, overwrite
        self.packed = packed  # None: dense; else {"nm": (N, M), "pruned": bool}
        self.folder = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        stem = "model" if packed is None else packing.PACKED_FILE.removesuffix(".safetensors")
        self.shards = Shards(self.folder, stem, n_layers + 1)  # one per layer, the last for the rest
        self.written: set[int] = set()
        # module path -> LinearReport of every layer written; their qparams (scales and zeros,
        # ~7 MiB per 7B layer) only while a GPTQ-layout copy may still be written at the end
        self.reports: dict = {}
        self.gptq_reason: str | None = None  # why that copy cannot be written, once a layer shows it
        self.linears: dict = {}   # packed header entries
        self.fallback: list[str] = []
        self.counts: dict[str, int] = {}  # packing.tally of what was written
        self.finished = False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.out)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir()

    def _prefix(self, i: int) -> str:
        return f"{self.spec.layers}.{i}."

    def write_layer(self, i: int, state: dict[str, torch.Tensor], reports: dict | None = None) -> None:
        """Layer i's tensors (keys relative to the layer) into its shard, in the save dtype; for
        packed saves the quantized linears packed (reports: relative name -> LinearReport)."""
        prefix = self._prefix(i)
        reps = {prefix + n: r for n, r in (reports or {}).items()}
        self._write(i, {prefix + k: v for k, v in state.items()}, reps)
        self.written.add(i)
        if self.packed is None or self.packed["pruned"]:  # no GPTQ copy at the end
            self.gptq_reason = self.gptq_reason or ("dense save" if self.packed is None else "pruned weights")
        elif self.gptq_reason is None and reps:
            import packing
            plan = packing.gptq_plan(reps)  # a layer off the layout keeps the whole model off it
            self.gptq_reason = plan if isinstance(plan, str) else None
        if self.gptq_reason is not None:  # the grids are not needed again: host memory stays flat
            if any(r.qparams is not None for r in self.reports.values()):
                self.reports = {n: r.without_grid() for n, r in self.reports.items()}
            reps = {n: r.without_grid() for n, r in reps.items()}
        self.reports.update(reps)

    def _write(self, k: int, tensors: dict[str, torch.Tensor], reports: dict, load=None) -> None:
        """tensors: on any device, not yet in the save dtype. Dense saves go to the file one tensor
        at a time (the host never holds the layer); packed saves pack the host copy. load (no
        quantized linears among the tensors; they are meta): as write_safetensors's."""
        if self.packed is None or load is not None:
            if load is not None and self.packed is not None:  # the parts outside the layers: nothing to pack
                # (tally needs only shapes and dtypes: the tensors are meta here)
                tensors = {n: v.to(self.save_dtype) if v.is_floating_point() else v for n, v in tensors.items()}
                import packing
                for key, v in packing.tally(tensors, {}).items():
                    self.counts[key] = self.counts.get(key, 0) + v
            self.shards.write(k, tensors, self.save_dtype, load)
            return
        import packing
        tensors = {n: _saved(v, self.save_dtype) for n, v in tensors.items()}
        tensors, linears, fallback = packing.pack_state(tensors, reports, self.packed["nm"])
        self.linears.update(linears)
        self.fallback += fallback
        for key, v in packing.tally(tensors, linears).items():
            self.counts[key] = self.counts.get(key, 0) + v
        self.shards.write(k, tensors)

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """The saved tensors of layer i (keys relative to the layer, in the save dtype); packed
        linears decoded exactly (packing.unpack_state), as load_packed decodes them."""
        import packing
        prefix = self._prefix(i)
        tensors = self.shards.read(i)
        if self.packed is not None:
            tensors = packing.unpack_state(tensors, {n: v for n, v in self.linears.items() if n.startswith(prefix)},
                                           self.save_dtype)
        return {k[len(prefix):]: v for k, v in tensors.items()}

    def finish(self, model, tokenizer, report: dict, outer=None) -> None:
        """Write the parts outside the decoder layers, the index, config, generation config,
        tokenizer and report (report["files"] lists them; packed saves add report["disk"]),
        then rename the folder into place (an existing one only if it is an earlier save of
        this tool, with --overwrite). outer (`LayerStore.outer_pieces`): where those parts are
        still parked (meta), each is read from the checkpoint in pieces as it is written, so the
        host never holds one of them (embeddings and head: 0.25 GiB each at 7B)."""
        import packing
        from model_io import plain_config
        missing = sorted(set(range(self.n_layers)) - self.written)
        if missing:
            raise RuntimeError(f"save: layers {missing[:5]} were never written")
        groups = _outer_groups(model, self.spec)
        state_vars = model.state_dict(keep_vars=True)
        load = None
        if outer is not None and any(state_vars[names[0]].is_meta for names in groups):
            state = {names[0]: state_vars[names[0]] for names in groups}  # meta: shapes and dtypes
            tied = {alias: names[0] for names in groups for alias in names[1:]}
            load = outer
        else:
            state, tied = packing.unique_state(model, skip=self.spec.layers + ".")
        self._write(self.n_layers, dict(state), {}, load)
        config = plain_config(model, self.save_dtype)
        if self.packed is None:
            self.shards.write_index()
        else:
            packing.warn_fallback(self.fallback)
            self.shards.write_index({"packing": packing.packed_header(self.save_dtype, tied, self.linears,
                                                                      self.fallback)})
            index = self.folder / f"{self.shards.stem}{INDEX_SUFFIX}"  # it holds the packing header
            disk = packing.disk_report(self.counts, self.shards.nbytes() + index.stat().st_size, tied,
                                       self.fallback, self.shards.count)
            if not self.reports or self.packed["pruned"]:
                disk["gptq"] = packing.gptq_skipped(self.packed["pruned"])
            elif self.gptq_reason is not None:
                disk["gptq"] = {"written": False, "reason": self.gptq_reason}
            else:
                disk["gptq"] = self._gptq_copy(config, state, tokenizer, load)
            report["disk"] = disk
        config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        report["files"] = sorted([p.name for p in self.folder.iterdir()] + [REPORT_FILE])
        (self.folder / REPORT_FILE).write_text(json.dumps(report, indent=1))
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        try:
            if self.out.exists():
                try:
                    check_save_target(self.out, self.overwrite)
                except UsageError as e:
                    raise UsageError(f"{e} (it changed during the run)") from None
                self.out.rename(old)
            self.folder.rename(self.out)
            self.finished = True
            self.shards.folder = self.out  # where read_layer finds the layers from now on
        finally:
            if old.exists():
                shutil.rmtree(old)

    def _gptq_copy(self, config, rest: dict[str, torch.Tensor], tokenizer, load=None) -> dict:
        """gptq/: the standard GPTQ checkpoint, sharded like the save, built layer by layer from the
        packed shards (decoded exactly), where every linear shares one GPTQ layout."""
        import packing
        plan = packing.gptq_plan(self.reports)
        if isinstance(plan, str):
            return {"written": False, "reason": plan}
        folder = self.folder / "gptq"
        folder.mkdir()
        shards = Shards(folder, "model", self.shards.count)
        for i in range(self.n_layers):
            prefix = self._prefix(i)
            state = {prefix + k: v for k, v in self.read_layer(i).items()}
            reason = packing.gptq_state(state, {n: r for n, r in self.reports.items() if n.startswith(prefix)}, plan)
            if reason is not None:
                shutil.rmtree(folder)
                return {"written": False, "reason": reason}
            shards.write(i, state)
        if load is None:
            shards.write(self.n_layers, {k: _saved(v, self.save_dtype) for k, v in rest.items()})
        else:
            shards.write(self.n_layers, rest, self.save_dtype, load)
        shards.write_index()
        return {**packing.write_gptq_config(folder, config, plan, tokenizer), "bytes": shards.nbytes()}

    def abort(self) -> None:
        """Remove the temporary folder of a run that did not finish."""
        if not self.finished and self.folder.exists():
            shutil.rmtree(self.folder)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


_DTYPES_BY_NAME = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _read_with_safetensors(path, name: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def _safetensors_header(f) -> dict:
    """The tensor entries of an open .safetensors file; f is left at the start of the data."""
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None, load=None) -> None:
    """A .safetensors file written one tensor at a time: each is brought to the host, cast
    (floating tensors to `dtype`, on the CPU, as `_saved`) and written, then dropped, so the
    host holds one tensor at most (safetensors' save_file holds the whole layer twice: the
    tensors and their bytes). Tensors are laid out as save_file lays them out (by element
    size, largest first, then by name); readers see the same file. load(name, dtype): that
    tensor's elements in order as 1-D host tensors in dtype, called when it is written (then
    `tensors` need only give shapes and dtypes: meta tensors do), for tensors not in memory."""
    def saved_dtype(t):
        return dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    names = sorted(tensors, key=lambda n: (-saved_dtype(tensors[n]).itemsize, n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for n in names:
        t = tensors[n]
        dt = saved_dtype(t)
        if dt not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{n}: {dt} cannot be stored in safetensors here")
        size = t.numel() * dt.itemsize
        header[n] = {"dtype": _SAFETENSORS_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for n in names:
            t, dt = tensors[n], saved_dtype(tensors[n])
            # host_pieces: from a GPU on the worker thread in staged pieces, else the whole tensor
            # as _saved(copy=False) gives it
            pieces = load(n, dt) if load is not None else host_copy.host_pieces(t, dt)
            for piece in pieces:
                f.write(memoryview(piece.reshape(-1).view(torch.uint8).numpy()))
            del t, pieces


def _saved(t: torch.Tensor, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
    """t on the CPU as the save holds it: floating tensors in the save dtype (cast on the CPU,
    as the whole-model save always did), contiguous, sharing no storage (copy=False: it may)."""
    src = t.detach()
    t = host_copy.to_host(src)
    t = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    shares = src.device.type == "cpu" and t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
    return t.clone() if copy and shares else t


def _remove_stale_partials(out: Path) -> None:
    """Temporary folders beside `out` that a killed run of this tool left (its process is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass
