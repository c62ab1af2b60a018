"""Several GPUs (python -m pytest -q tests_gpu on a machine with 2 or more): compression and
evaluation spread over every visible GPU equal the one-GPU run up to float rounding, and
each GPU really holds a share of the work."""
from __future__ import annotations

import pytest
import torch

from compress import compress_model
from config import CompressConfig
from layerwise import perplexity
from model_io import ARCHS, load_model, load_tokenizer
from conftest import make_model, write_texts

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")

# min-max grids and fp32 grid steps for the weight-level comparison, as in tests/test_parallel.py:
# the MSE clipping search and the fp16 stored steps are discrete choices that a Hessian summed in
# another order can tip, and the tipped choice cascades through the layer's later linears (seen on
# 2 x H200 with both: perplexity within 0.07%, but 17% of the weights and 57% of the linears'
# widths moved). "mi_sparse50_mse" runs the defaults and compares the model's output only.
CONFIGS = {
    "mi_sparse50": dict(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4, clip="minmax"),
    "mi_t3.0": dict(wbits=4, target_avg_bits=3.0, n_groups=4, clip="minmax"),
    "gptq_w4_g32": dict(use_mi_grouping=False, wbits=4, groupsize=32, clip="minmax"),
    "mi_sparse50_mse": dict(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4),
    # --true_sequential 0: whole linear sets solved on different GPUs. Its weights move more under the
    # reordered Hessian sums than true-sequential's (2 x H200: 0.9964 of the weights within rounding, the
    # same with every solve pinned to the first GPU, perplexity within 0.03%), so test_one_pass_split
    # checks the split of the solves exactly and this case is held to 0.99
    "mi_sparse50_one_pass": dict(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4, clip="minmax",
                                 true_sequential=False),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    write_texts(root)
    return make_model(root / "llama", "llama"), root


@pytest.mark.parametrize("case", list(CONFIGS))
def test_all_gpus_equal_one(case, tiny, monkeypatch):
    import quant
    from datautils import get_eval_tokens, get_loaders
    path, root = tiny
    tok = load_tokenizer(str(path), False)
    cfg = CompressConfig(**CONFIGS[case])
    strict = cfg.clip == "minmax"
    if strict:
        monkeypatch.setattr(quant, "SCALE_DTYPE", torch.float32)
    windows = get_loaders(str(root / "calib.txt"), tok, 16, 0, 128)
    tokens = get_eval_tokens(str(root / "eval.txt"), tok, 128)
    out = {}
    for devs in ([torch.device("cuda:0")], [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]):
        model = load_model(str(path), torch.float16, False)
        for d in devs:
            torch.zeros(1, device=d)  # a device's allocator must exist before its peak can be reset
            torch.cuda.reset_peak_memory_stats(d)
        with torch.no_grad():
            reports = compress_model(model, ARCHS["llama"], cfg, windows, devs, torch.float16, lambda m: None).reports
            ppl = perplexity(model, ARCHS["llama"], tokens, 128, devs, torch.float16, 8)
        used = [torch.cuda.max_memory_allocated(d) > 0 for d in devs]
        out[len(devs)] = model.state_dict(), reports, ppl, used
    (sd1, rep1, ppl1, _), (sdn, repn, ppln, used) = out[1], out[max(out)]
    assert all(used)  # every GPU allocated (did work)
    close = sum(int(torch.isclose(sdn[k].float(), sd1[k].float(), rtol=1e-2, atol=1e-3).sum()) for k in sd1)
    close /= sum(v.numel() for v in sd1.values())
    same_bits = sum(repn[name].avg_bits == r.avg_bits for name, r in rep1.items()) / len(rep1)
    seen = f"ppl {ppl1:.4f} vs {ppln:.4f}, weights close {close:.5f}, same widths {same_bits:.3f}"
    assert ppln == pytest.approx(ppl1, rel=2e-3), seen
    if not strict:
        return
    assert close > (0.99 if not cfg.true_sequential else 0.999), seen  # rounding may move a few weights a step
    assert same_bits >= 0.9, seen  # a near tie in the allocation may flip under rounding


def run_tiny(tiny, cfg, devs, monkeypatch=None, pin=False):
    """The tiny model compressed on devs; its state dict (on the CPU). pin: every linear set's
    solve on the first device (--true_sequential 0 otherwise spreads them)."""
    import compress
    from datautils import get_loaders
    path, root = tiny
    tok = load_tokenizer(str(path), False)
    windows = get_loaders(str(root / "calib.txt"), tok, 16, 0, 128)
    if pin:
        monkeypatch.setattr(compress, "assign_sets", lambda costs, parts: [0] * len(costs))
    model = load_model(str(path), torch.float16, False)
    with torch.no_grad():
        compress_model(model, ARCHS["llama"], CompressConfig(**cfg), windows, devs, torch.float16, lambda m: None)
    return {k: v.cpu() for k, v in model.state_dict().items()}


def test_one_pass_split(tiny, monkeypatch):
    """With the same statistics, a set solved on another GPU is what it would be on the first."""
    devs = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    spread = run_tiny(tiny, CONFIGS["mi_sparse50_one_pass"], devs)
    pinned = run_tiny(tiny, CONFIGS["mi_sparse50_one_pass"], devs, monkeypatch, pin=True)
    for k in spread:
        assert torch.equal(spread[k], pinned[k]), k


def test_second_gpu_alone(tiny):
    """--device cuda:1 alone: the Triton kernels launch on the tensors' GPU, not the current one
    (this raised "Pointer argument cannot be accessed from Triton" before), and one GPU is
    deterministic, so the result equals cuda:0's bit for bit."""
    cfg = CONFIGS["mi_sparse50_mse"]
    first = run_tiny(tiny, cfg, [torch.device("cuda:0")])
    second = run_tiny(tiny, cfg, [torch.device("cuda:1")])
    for k in first:
        assert torch.equal(first[k], second[k]), k
