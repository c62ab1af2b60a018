"""Staged copies beside the GPU's work (host_copy.py, python -m pytest -q tests_gpu on a CUDA
machine): every dtype and size, across staging-buffer boundaries, arrives bit for bit as a plain
copy; the default stream's later kernels do not wait for a staged copy; a streamed run that reads
ahead and writes behind this way saves what the plain run saves."""
from __future__ import annotations

import threading

import pytest
import torch

import host_copy
from compress import compress_model
from config import CompressConfig
from datautils import get_eval_tokens, get_loaders
from helpers import saved_tensors
from layerwise import perplexity
from model_io import ARCHS, load_tokenizer
from streaming import LayerStore, SaveWriter, TensorFiles, load_skeleton
from conftest import make_model, write_texts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [((), torch.float32), ((0,), torch.float16), ((3, 5), torch.bool), ((7, 1001), torch.int8),
         ((513, 257), torch.float16), ((300, 301), torch.bfloat16), ((100, 777), torch.float32),
         ((4099,), torch.int64), ((64, 96), torch.int16)]


def _in_thread(fn):
    """fn() on a fresh thread (fresh staging buffers, sized by CHUNK_BYTES now); its result."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _tensor(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("chunk", [1024, 4096 * 3, host_copy.CHUNK_BYTES])
def test_staged_copies_equal_plain_copies(chunk, monkeypatch):
    monkeypatch.setattr(host_copy, "CHUNK_BYTES", chunk)
    dev = torch.device("cuda", 0)
    src = [_tensor(s, d, k) for k, (s, d) in enumerate(CASES)]
    on_dev = [t.to(dev) for t in src]

    def staged():
        with host_copy.side_copies():
            assert host_copy.staged(dev) and not host_copy.staged("cpu")
            up = [host_copy.to_device(t, dev) for t in src]
            down = [host_copy.to_host(t) for t in on_dev]
            halves = [torch.cat([p.clone() for p in host_copy.host_pieces(t, torch.float16)] or
                                [torch.empty(0, dtype=torch.float16 if t.is_floating_point() else t.dtype)])
                      for t in on_dev]
        return up, down, halves
    up, down, halves = _in_thread(staged)
    for t, u, d, h in zip(src, up, down, halves):
        assert u.device == dev and u.dtype == t.dtype and u.shape == t.shape
        assert torch.equal(u.cpu(), t) and torch.equal(d, t) and d.device.type == "cpu"
        want = (t.to(torch.float16) if t.is_floating_point() else t).reshape(-1)
        assert h.dtype == want.dtype and torch.equal(h, want)
    assert not host_copy.staged(dev)  # outside a block: plain copies
    assert host_copy.to_host(on_dev[4]).device.type == "cpu"


@pytest.mark.parametrize("chunk", [1000, host_copy.CHUNK_BYTES])
def test_tensors_read_from_a_file_straight_to_the_gpu(chunk, tmp_path, monkeypatch):
    """TensorFiles.read_to on the worker thread (staged, from the file through the buffers, cast
    on the device) equals the plain read cast on the host, for every stored dtype."""
    from streaming import write_safetensors
    monkeypatch.setattr(host_copy, "CHUNK_BYTES", chunk)
    dev = torch.device("cuda", 0)
    tensors = {f"t{k}": _tensor(s, d, k) for k, (s, d) in enumerate(CASES)}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    files = TensorFiles(tmp_path)
    for dtype in (torch.float16, torch.float32):
        def staged():
            with host_copy.side_copies():
                return files.read_to(list(tensors), dev, dtype)
        got = _in_thread(staged)
        want = files.read_to(list(tensors), dev, dtype)  # not staged: read, cast on the host
        for k, t in tensors.items():
            assert got[k].device == dev and got[k].dtype == want[k].dtype == (dtype if t.is_floating_point() else t.dtype)
            assert torch.equal(got[k], want[k]), k


def test_later_kernels_do_not_wait_for_a_staged_copy():
    """A copy of 1 GiB queued on the worker thread, then a short kernel on the default stream:
    the kernel finishes long before the copy does (plain .to(dev) would make it wait)."""
    dev = torch.device("cuda", 0)
    big = torch.ones(1 << 29, dtype=torch.float16)  # 1 GiB, pageable
    x = torch.randn(256, 256, device=dev)
    (x @ x).sum().item()  # cuBLAS set up for this thread beforehand (its first call alone can take 0.1 s or more)
    torch.cuda.synchronize()
    started, finished = threading.Event(), {}

    def copy():
        with host_copy.side_copies():
            started.set()
            host_copy.to_device(big, dev)
    t = threading.Thread(target=copy)
    t.start()
    started.wait()
    (x @ x).sum().item()  # returns while the copy is still going on
    finished["kernel"] = not t.is_alive()
    t.join()
    assert finished["kernel"] is False


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    write_texts(root)
    return make_model(root / "llama", "llama"), root


def test_read_ahead_and_write_behind_on_the_gpu_give_the_plain_save(model_and_text, tmp_path):
    path, root = model_and_text
    dev = torch.device("cuda", 0)
    tok = load_tokenizer(str(path), False)
    windows = get_loaders(str(root / "calib.txt"), tok, 4, 0, 64)
    tokens = get_eval_tokens(str(root / "eval.txt"), tok, 64)
    cfg = CompressConfig(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4, clip="minmax")
    spec = ARCHS["llama"]
    saved, ppl = {}, {}
    for overlap in (False, True):
        files = TensorFiles(path)
        model = load_skeleton(path, files, torch.float16, spec)
        out = tmp_path / f"out-{overlap}"
        store = LayerStore(model, spec, torch.float16, files,
                           SaveWriter(out, model.config.num_hidden_layers, spec, torch.float16))
        compress_model(model, spec, cfg, windows, dev, torch.float16, store=store, overlap_io=overlap)
        assert store.background == overlap
        store.writer.finish(model, tok, {})
        ppl[overlap] = perplexity(model, spec, tokens, 64, dev, torch.float16, 4, store=store)
        store.close()
        saved[overlap] = saved_tensors(out)
    assert saved[True].keys() == saved[False].keys()
    assert all(torch.equal(saved[True][k], saved[False][k]) for k in saved[False])
    assert ppl[True] == ppl[False]
