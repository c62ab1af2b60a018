"""Streamed weights (streaming.py) and activations kept in host memory (--max_gpu_memory): the
skeleton holds what from_pretrained loads, a streamed run saves bit for bit what the whole-model
run saves, the evaluation reads the saved layers, resident memory does not grow with the number
of layers, and the activations passing through the device in pieces give the resident result."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import compress_model
from config import CompressConfig
from datautils import get_eval_tokens, get_loaders
from helpers import ROOT, run_cli, saved_tensors
from layerwise import offload_activations, perplexity
from model_io import ARCHS, load_model, load_tokenizer
from streaming import LayerStore, SaveWriter, TensorFiles, load_skeleton

MI = ["--device", "cpu", "--nsamples", "4", "--seqlen", "64", "--sparsity", "0.5", "--wbits", "4",
      "--target_avg_bits", "3.5", "--n_groups", "4"]


@pytest.fixture(scope="module")
def sharded_tied(tmp_path_factory) -> Path:
    """A tiny llama with tied embeddings, saved in float16 as several shards with an index."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from conftest import make_tokenizer
    path = tmp_path_factory.mktemp("sharded") / "llama"
    torch.manual_seed(1)
    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).half().save_pretrained(path, max_shard_size="30KB")
    make_tokenizer(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_skeleton_holds_what_from_pretrained_loads(tiny_models, sharded_tied):
    for path in [*tiny_models.values(), sharded_tied]:
        whole = load_model(str(path), torch.float32, False)
        spec = ARCHS[whole.config.model_type]
        files = TensorFiles(path)
        model = load_skeleton(path, files, torch.float32, spec)
        inside = spec.layers + "."
        expected = {k: v for k, v in [*whole.state_dict().items(), *whole.named_buffers()] if not k.startswith(inside)}
        got = {k: v for k, v in [*model.state_dict().items(), *model.named_buffers()] if not k.startswith(inside)}
        assert got.keys() == expected.keys(), path
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), (path.name, k)
        if whole.config.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all(p.is_meta for p in model.model.layers.parameters()), "no layer is read before its turn"
        store = LayerStore(model, spec, torch.float32, files)
        for i, layer in enumerate(whole.model.layers):
            loaded = store.load(i, "cpu")
            assert loaded.state_dict().keys() == layer.state_dict().keys()
            assert all(torch.equal(v, layer.state_dict()[k]) for k, v in loaded.state_dict().items())
            store.unload(i, loaded)
            assert all(p.is_meta for p in loaded.parameters())
        # as the CLI builds it: the head is read only when needed (tied, it is the embeddings)
        lean = load_skeleton(path, files, torch.float32, spec, head=False)
        assert lean.lm_head.weight.is_meta != bool(whole.config.tie_word_embeddings)
        assert not lean.model.embed_tokens.weight.is_meta and not lean.model.norm.weight.is_meta
        LayerStore(lean, spec, torch.float32, files).restore_outer()
        assert torch.equal(lean.lm_head.weight, whole.lm_head.weight)


def test_embeddings_and_head_leave_host_memory_while_the_layers_are_worked_on(tiny_models, sharded_tied,
                                                                                text_files, monkeypatch):
    """Streamed: while compress_model works on the layers, the parts outside them (embeddings,
    final norm, head: 0.5 GiB at 7B) are meta, and afterwards they are back, equal to the files
    and still tied where the model ties them; held whole, they stay."""
    import compress
    seen = []
    real = compress.compress_layer

    def spy(team, i, *args, **kwargs):
        seen.append([t.is_meta for n, t in model.state_dict(keep_vars=True).items() if not n.startswith("model.layers.")])
        return real(team, i, *args, **kwargs)

    monkeypatch.setattr(compress, "compress_layer", spy)
    cfg = CompressConfig(wbits=4, target_avg_bits=3.5, n_groups=4)
    for path in (tiny_models["llama"], sharded_tied):
        spec = ARCHS["llama"]
        files = TensorFiles(path)
        tok = load_tokenizer(str(path), False)
        windows = get_loaders(str(text_files["calib"]), tok, 2, 0, 32)
        for streamed in (True, False):
            seen.clear()
            model = load_skeleton(path, files, torch.float32, spec) if streamed else \
                load_model(str(path), torch.float32, False)
            store = LayerStore(model, spec, torch.float32, files if streamed else None)
            with torch.no_grad():
                compress_model(model, spec, cfg, windows, "cpu", torch.float32, store=store)
            assert len(seen) == len(store) and all(all(m) if streamed else not any(m) for m in seen), path
            outer = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
            stored = files.read([k for k in outer if k in files.where])
            assert all(not v.is_meta for v in outer.values())
            for k, v in stored.items():
                assert torch.equal(outer[k], v.float()), (path.name, k)
            if model.config.tie_word_embeddings:
                assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("case", ["llama-fake", "qwen2-packed", "sharded-fake"])
def test_streamed_run_saves_what_the_whole_model_run_saves(case, tiny_models, sharded_tied, text_files, tmp_path):
    """The same command with and without --no_stream: every saved tensor equal, the same report
    and perplexity (the streamed run evaluates the layers it saved)."""
    import json
    import packing
    arch, fmt = case.split("-")
    model = sharded_tied if arch == "sharded" else tiny_models[arch]
    argv = [str(model), str(text_files["calib"]), *MI, "--eval", str(text_files["eval"]), "--eval_windows", "4",
            "--save_format", fmt]
    streamed = run_cli(argv + ["--save", str(tmp_path / "streamed")])
    whole = run_cli(argv + ["--save", str(tmp_path / "whole"), "--no_stream"])
    assert streamed.returncode == 0 and whole.returncode == 0, streamed.stdout + streamed.stderr + whole.stderr
    assert "streaming" in streamed.stdout and "streaming" not in whole.stdout
    if fmt == "fake":
        a, b = saved_tensors(tmp_path / "streamed"), saved_tensors(tmp_path / "whole")
        assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    else:
        (ha, a), (hb, b) = packing.read_packed(tmp_path / "streamed"), packing.read_packed(tmp_path / "whole")
        assert ha == hb
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((tmp_path / d / "compression_report.json").read_text()) for d in ("streamed", "whole"))
    assert ra["ppl"] == rb["ppl"] and ra["saved_dtype"] == rb["saved_dtype"]
    assert {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in ra["linears"].items()} == \
        {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in rb["linears"].items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "whole"], "no temporary folder is left"


def test_profile_times_every_stage_of_a_streamed_run(sharded_tied, text_files, tmp_path):
    """--profile: the stage seconds of all layers (the layer's work and the layer files' reading and
    writing) are printed and kept in the report; together they fit in the compression's time."""
    import json
    argv = [str(sharded_tied), str(text_files["calib"]), *MI, "--eval", "none", "--save", str(tmp_path / "out"),
            "--profile", "--no_checkpoint"]
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("stages (s, all layers):"))
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    stages = report["stage_seconds"]
    for stage in ("forward+hessian", "mi", "clustering", "allocation", "solve", "forward outputs", "layer in",
                  "layer out"):
        assert stages[stage] >= 0 and f"{stage} " in line, stage
    assert 0 < sum(stages.values()) <= report["seconds"]
    plain = run_cli([a for a in argv if a != "--profile"] + ["--overwrite"])
    assert plain.returncode == 0 and "stages (s" not in plain.stdout
    assert "stage_seconds" not in json.loads((tmp_path / "out" / "compression_report.json").read_text())


def test_hub_models_stream_from_their_download(tiny_models, tmp_path, monkeypatch):
    """A hub id streams from its snapshot (configuration and safetensors only, downloaded once into
    the hub cache); a failed download, a folder without safetensors and an unreadable .gguf file
    take the whole-model path."""
    import huggingface_hub
    from streaming import local_checkpoint
    asked = []

    def download(repo_id, allow_patterns=None, **kw):
        asked.append((repo_id, allow_patterns))
        return str(tiny_models["llama"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert local_checkpoint("someone/tiny-llama") == tiny_models["llama"]
    assert asked == [("someone/tiny-llama", ["*.json", "*.safetensors"])]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert local_checkpoint("someone/tiny-llama") is None
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    assert local_checkpoint(str(tmp_path / "bin")) is None
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert local_checkpoint(str(tmp_path / "m.gguf")) is None
    # with the run's dtype a .gguf file is converted (tests/test_smollm2.py); one that cannot be
    # read takes the whole-model path, which reports why, and leaves nothing in the cache
    monkeypatch.setenv("VICUNA_MI_CACHE", str(tmp_path / "cache"))
    assert local_checkpoint(str(tmp_path / "m.gguf"), torch.float16) is None
    assert not any((tmp_path / "cache").rglob("*.safetensors")) and not list((tmp_path / "cache").rglob("*partial*"))


def _streamed(path: Path, writer_dir: Path | None, dtype=torch.float32):
    spec = ARCHS["llama"]
    files = TensorFiles(path)
    model = load_skeleton(path, files, dtype, spec)
    writer = SaveWriter(writer_dir, model.config.num_hidden_layers, spec, dtype) if writer_dir else None
    return model, spec, LayerStore(model, spec, dtype, files, writer)


def test_parked_outer_parts_are_saved_one_at_a_time(tiny_models, tmp_path, monkeypatch):
    """A streamed save whose embeddings and head are still parked reads each of them from the
    checkpoint in pieces of at most host_copy.CHUNK_BYTES only when it is written (the host never
    holds one whole) and writes the same files as the save of a model that holds them."""
    import host_copy
    monkeypatch.setattr(host_copy, "CHUNK_BYTES", 4096)
    tok = load_tokenizer(str(tiny_models["llama"]), False)
    outs = {}
    for parked in (False, True):
        out = tmp_path / f"out-{parked}"
        model, spec, store = _streamed(tiny_models["llama"], out)
        for i in range(len(store)):
            layer = store.load(i, "cpu")
            store.finish(i, layer)
            store.unload(i, layer)
        pieces: dict[str, list[int]] = {}

        def outer(name, dtype):
            for piece in store.outer_pieces(name, dtype):
                assert piece.dim() == 1 and piece.dtype == dtype and piece.numel() * dtype.itemsize <= 4096
                pieces.setdefault(name, []).append(piece.numel())
                yield piece
        if parked:
            store.park_outer()
            assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
        store.writer.finish(model, tok, {}, outer=outer)
        assert sorted(pieces) == (["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"] if parked else [])
        if parked:  # 300 x 64 float32: 75 KiB in 19 pieces
            assert len(pieces["model.embed_tokens.weight"]) == 19 and sum(pieces["lm_head.weight"]) == 300 * 64
        outs[parked] = saved_tensors(out)
    assert outs[True].keys() == outs[False].keys()
    assert all(torch.equal(outs[True][k], outs[False][k]) for k in outs[False])


def test_evaluation_reads_the_saved_layers(tiny_models, text_files, tmp_path):
    """After the save the original files are not needed: the evaluation reads the compressed
    layers from the output (or, without a save, from memory) and gets the saved model's perplexity."""
    from transformers import AutoModelForCausalLM
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    tok = load_tokenizer(str(src), False)
    windows = get_loaders(str(text_files["calib"]), tok, 4, 0, 64)
    tokens = get_eval_tokens(str(text_files["eval"]), tok, 64)
    cfg = CompressConfig(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4)
    cpu = torch.device("cpu")

    model, spec, store = _streamed(src, tmp_path / "out")
    compress_model(model, spec, cfg, windows, cpu, torch.float32, store=store)
    store.writer.finish(model, tok, {})
    kept_model, _, kept = _streamed(src, None)  # no save: the compressed layers stay in memory
    compress_model(kept_model, spec, cfg, windows, cpu, torch.float32, store=kept)
    shutil.rmtree(src)  # the originals are gone
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    expected = perplexity(saved, spec, tokens, 64, cpu, torch.float32, 4)
    assert perplexity(model, spec, tokens, 64, cpu, torch.float32, 4, store=store) == expected
    assert perplexity(kept_model, spec, tokens, 64, cpu, torch.float32, 4, store=kept) == expected


def test_layer_files_read_ahead_and_written_behind_give_the_same_save(tiny_models, text_files, tmp_path,
                                                                      monkeypatch):
    """overlap_io: the next layer is read and the finished one written on the worker thread (each
    layer read once, the reads ahead of the layer being worked on); the save folder and the
    evaluation equal the plain run's bit for bit; a writer's error reaches the caller."""
    import threading
    tok = load_tokenizer(str(tiny_models["llama"]), False)
    windows = get_loaders(str(text_files["calib"]), tok, 4, 0, 64)
    tokens = get_eval_tokens(str(text_files["eval"]), tok, 64)
    cfg = CompressConfig(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4)
    cpu = torch.device("cpu")
    load, write = LayerStore._load, SaveWriter.write_layer
    log = []

    def spy_load(self, i, dev):
        log.append(("read", i, threading.current_thread().name))
        return load(self, i, dev)

    def spy_write(self, i, state, reports=None):
        log.append(("write", i, threading.current_thread().name))
        return write(self, i, state, reports)
    monkeypatch.setattr(LayerStore, "_load", spy_load)
    monkeypatch.setattr(SaveWriter, "write_layer", spy_write)
    saved, ppl = {}, {}
    for overlap in (False, True):
        log.clear()
        model, spec, store = _streamed(tiny_models["llama"], tmp_path / f"out-{overlap}")
        compress_model(model, spec, cfg, windows, cpu, torch.float32, store=store, overlap_io=overlap)
        assert store.background == overlap
        run = list(log)
        store.writer.finish(model, tok, {})
        ppl[overlap] = perplexity(model, spec, tokens, 64, cpu, torch.float32, 4, store=store)
        saved[overlap] = saved_tensors(tmp_path / f"out-{overlap}")
        store.close()
        n = len(store)
        assert sorted(i for kind, i, _ in run if kind == "read") == list(range(n))
        assert sorted(i for kind, i, _ in run if kind == "write") == list(range(n))
        workers = {t for _, i, t in run if i > 0}  # layer 0 is read before any work starts
        assert (workers <= {"MainThread"}) != overlap and (not overlap or all(t.startswith("layer-files") for t in workers))
        if overlap:  # layer i + 1 was read before layer i was written
            order = [(kind, i) for kind, i, _ in run]
            assert all(order.index(("read", i + 1)) < order.index(("write", i)) for i in range(n - 1))
    assert saved[True].keys() == saved[False].keys()
    assert all(torch.equal(saved[True][k], saved[False][k]) for k in saved[False])
    assert ppl[True] == ppl[False]

    def broken(self, i, state, reports=None):
        if i == 1:
            raise OSError("disk full")
        return write(self, i, state, reports)
    monkeypatch.setattr(SaveWriter, "write_layer", broken)
    model, spec, store = _streamed(tiny_models["llama"], tmp_path / "out-broken")
    with pytest.raises(OSError, match="disk full"):
        compress_model(model, spec, cfg, windows, cpu, torch.float32, store=store, overlap_io=True)
    store.close()


def test_compression_and_evaluation_build_no_autograd_graph(tiny_models, text_files, monkeypatch):
    """Every calibration and evaluation forward runs without autograd. Layers loaded from disk hold
    parameters that require grad; a forward with grad on chains each layer's graph to the next
    through the activations, which then keep every layer's intermediates alive (a 30-layer model
    grew by 6 GiB of GPU memory per layer that way)."""
    import layerwise
    grad_on, forward = [], layerwise.Team.forward

    def recording(team, in_place):
        grad_on.append(torch.is_grad_enabled())
        return forward(team, in_place)
    monkeypatch.setattr(layerwise.Team, "forward", recording)
    tok = load_tokenizer(str(tiny_models["llama"]), False)
    windows = get_loaders(str(text_files["calib"]), tok, 4, 0, 32)
    model = load_model(str(tiny_models["llama"]), torch.float32, False)
    model.requires_grad_(True)
    cfg = CompressConfig(wbits=4, target_avg_bits=3.5, n_groups=4)
    compress_model(model, ARCHS["llama"], cfg, windows, torch.device("cpu"), torch.float32)
    perplexity(model, ARCHS["llama"], get_eval_tokens(str(text_files["eval"]), tok, 32), 32, torch.device("cpu"),
               torch.float32, 2)
    assert len(grad_on) >= 2 * len(model.model.layers) and not any(grad_on)


def test_activations_in_host_memory_give_the_resident_result(tiny_models, text_files):
    """--max_gpu_memory too small for the activations: they stay in host memory and pass through
    the device a batch at a time; the compressed weights, reports and perplexity are bitwise those
    of the resident run (on the CPU both are host memory, but the staged code path runs)."""
    tok = load_tokenizer(str(tiny_models["qwen2"]), False)
    windows = get_loaders(str(text_files["calib"]), tok, 6, 0, 64)
    tokens = get_eval_tokens(str(text_files["eval"]), tok, 64)
    cfg = CompressConfig(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4)
    cpu = torch.device("cpu")
    runs = []
    for cap in (None, 1e-6):
        model = load_model(str(tiny_models["qwen2"]), torch.float32, False)
        assert offload_activations(model.config, 6, 64, torch.float32, [cpu], cap) == (cap is not None)
        reports = compress_model(model, ARCHS["qwen2"], cfg, windows, cpu, torch.float32, fwd_batch=4,
                                 max_gpu_memory=cap).reports
        ppl = perplexity(model, ARCHS["qwen2"], tokens, 64, cpu, torch.float32, 5, fwd_batch=2, max_gpu_memory=cap)
        runs.append((model.state_dict(), reports, ppl))
    (sa, ra, pa), (sb, rb, pb) = runs
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {k: (r.loss, r.groups) for k, r in ra.items()} == {k: (r.loss, r.groups) for k, r in rb.items()}
    assert pa == pb
    assert not offload_activations(load_model(str(tiny_models["qwen2"]), torch.float32, False).config,
                                   6, 64, torch.float32, [cpu], 1000.0)


# ---------------------------------------------------------------- host memory
def _random_llama(path: Path, layers: int) -> int:
    """A random llama of `layers` layers, hidden 512 / FFN 1408 (8 MB per layer in float16),
    saved sharded; returns one layer's bytes in float32 (what a CPU run computes in)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from conftest import make_tokenizer
    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=512, intermediate_size=1408,
                               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                               max_position_embeddings=256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(layers)
    for p in model.parameters():
        p.data.normal_(0, 0.02, generator=gen)
    model.save_pretrained(path, max_shard_size="30MB")
    make_tokenizer(path)
    return 4 * sum(p.numel() for p in model.model.layers[0].parameters())


PEAK = ("import sys, vicuna_mi; rc = vicuna_mi.main(sys.argv[1:]); "
        "print(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))); sys.exit(rc)")


def _peak_rss_mib(args: list[str]) -> float:
    """Peak resident memory of a CLI run, read by the process itself (VmHWM: the high-water mark
    of its own memory since it started; wait4's ru_maxrss would also count the memory of this
    test process, which the child shares until it execs)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1].split()[1]) / 1024  # kB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_host_memory_does_not_grow_with_the_number_of_layers(text_files, tmp_path):
    """4 and 16 layers, each several MB, streamed from sharded safetensors and written to --save
    (checkpoints on, as by default): the peak resident memory of the 16-layer run is that of the
    4-layer run although the model on disk is 4x larger. Held whole (--no_stream) it grows with
    the model: measured 607 MiB with 4 layers, 900 MiB with 16 (streamed: 489 and 499 MiB)."""
    peaks = {}
    for n in (4, 16):
        layer_bytes = _random_llama(tmp_path / f"m{n}", n)
        peaks[n] = _peak_rss_mib([str(tmp_path / f"m{n}"), str(text_files["calib"]), "--device", "cpu", "--rtn",
                                  "--wbits", "4", "--seqlen", "64", "--eval", "none", "--save", str(tmp_path / f"o{n}")])
        shutil.rmtree(tmp_path / f"m{n}")
    disk = sum(p.stat().st_size for p in (tmp_path / "o16").glob("*.safetensors"))
    assert disk > 3 * sum(p.stat().st_size for p in (tmp_path / "o4").glob("*.safetensors"))
    grown = peaks[16] - peaks[4]  # what holding the 12 more layers would add: 12 * layer_bytes
    assert peaks[16] < 1.3 * peaks[4] and grown < 0.25 * 12 * layer_bytes / 2 ** 20, \
        f"peak {peaks[4]:.0f} MiB with 4 layers, {peaks[16]:.0f} MiB with 16 (a layer is {layer_bytes / 2**20:.0f} MiB)"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_tensors_of_a_file_are_read_one_at_a_time(tmp_path):
    """TensorFiles.read without a memory mapping: reading the four 16 MiB tensors of one file, each
    consumed as it comes, raises the peak resident memory by about one of them (a mapped file's
    touched pages stay resident until it is closed: through safetensors' safe_open the same reads
    raised it by 68 MiB). Their values come back as stored, for every dtype."""
    from streaming import write_safetensors
    names = [f"w{i}" for i in range(4)]
    write_safetensors(tmp_path / "model.safetensors", {n: torch.full((4 << 20,), float(i)) for i, n in enumerate(names)})
    script = f"""
import streaming
streaming.bound_host_memory()
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
files = streaming.TensorFiles({str(tmp_path)!r})
h0 = hwm()
sums = files.read({names!r}, lambda v: float(v.sum()))
print(hwm() - h0, [sums[n] for n in {names!r}])
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, sums = out.stdout.split(maxsplit=1)
    assert float(grown) < 24, f"peak +{float(grown):.1f} MiB for 16 MiB tensors read one at a time"
    assert eval(sums) == [float(i * (4 << 20)) for i in range(4)]
    tensors = {f"t{k}": t for k, t in enumerate([torch.randn(3, 5).half(), torch.randn(7).bfloat16(),
                                                  torch.arange(6, dtype=torch.int64).reshape(2, 3),
                                                  torch.tensor(True), torch.zeros(0, 4)])}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    back = TensorFiles(tmp_path).read(list(tensors))
    assert all(back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t) for k, t in tensors.items())


def test_safetensors_written_tensor_by_tensor_read_as_save_file_writes_them(tmp_path):
    """streaming.write_safetensors (the dense save's writer: one tensor on the host at a time)
    gives files that safetensors reads back exactly, with the metadata, for every dtype the
    saves hold, 0-d and non-contiguous tensors, and the cast that `_saved` applies."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from streaming import _saved, write_safetensors
    g = torch.Generator().manual_seed(0)
    tensors = {"w.f32": torch.randn(5, 7, generator=g), "b.bf16": torch.randn(3, generator=g).bfloat16(),
               "t.f16": torch.randn(4, 6, generator=g).half().t(), "scalar": torch.tensor(2.5),
               "mask": torch.rand(9, generator=g) > 0.5, "codes": torch.randint(0, 255, (3, 4), generator=g,
                                                                               dtype=torch.uint8),
               "perm": torch.randperm(11, generator=g).to(torch.int16), "i64": torch.arange(3)}
    for dtype in (None, torch.float16):
        ours, ref = tmp_path / f"ours-{dtype}.safetensors", tmp_path / f"ref-{dtype}.safetensors"
        write_safetensors(ours, tensors, dtype, {"format": "pt"})
        save_file({k: _saved(v, dtype) if dtype else v.contiguous() for k, v in tensors.items()}, str(ref),
                  metadata={"format": "pt"})
        with safe_open(str(ours), framework="pt") as a, safe_open(str(ref), framework="pt") as b:
            assert a.metadata() == {"format": "pt"} and sorted(a.keys()) == sorted(b.keys())
            for k in b.keys():
                x, y = a.get_tensor(k), b.get_tensor(k)
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
        assert ours.stat().st_size <= ref.stat().st_size + 8 * len(tensors)
        if dtype is not None:
            with safe_open(str(ours), framework="pt") as a:
                assert a.get_tensor("w.f32").dtype == torch.float16 and a.get_tensor("mask").dtype == torch.bool
