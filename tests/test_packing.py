"""Packed saves: bit-exact round trip against the dense (fake) save, the promised size, and
the GPTQ-layout copy decoded independently from the layout's definition."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import packing
from compress import compress_model
from helpers import saved_tensors
from config import CompressConfig
from model_io import ARCHS, load_model, load_tokenizer, save_model
from quant import magnitude_prune
from quant import rtn_quantize

REPO = Path(__file__).resolve().parents[1]

# name: (model, dtype, CompressConfig fields)
CASES = {
    "mi_sparse50": ("llama", torch.float16, dict(sparsity=0.5, wbits=4, target_avg_bits=3.5, n_groups=4)),
    "mi_nm24": ("mistral", torch.float32, dict(prunen=2, prunem=4, wbits=4, target_avg_bits=3.0, n_groups=4)),
    "gptq_w4_g32": ("qwen2", torch.float32, dict(use_mi_grouping=False, wbits=4, groupsize=32)),
    "rtn_w3": ("llama", torch.float16, dict(use_mi_grouping=False, rtn=True, wbits=3)),
    "mi_t3.0": ("llama", torch.float32, dict(wbits=4, target_avg_bits=3.0, n_groups=4)),
}


@pytest.fixture(scope="module")
def compressed(tiny_models, text_files):
    """case -> (model, tokenizer, reports, cfg), each compressed once."""
    from datautils import get_loaders
    cache = {}

    def get(case: str):
        if case not in cache:
            kind, dtype, fields = CASES[case]
            cfg = CompressConfig(**fields)
            tok = load_tokenizer(str(tiny_models[kind]), False)
            model = load_model(str(tiny_models[kind]), dtype, False)
            windows = [] if cfg.rtn else get_loaders(str(text_files["calib"]), tok, 4, 0, 32)
            reports = compress_model(model, ARCHS[kind], cfg, windows, torch.device("cpu"), dtype,
                                     lambda msg: None).reports
            cache[case] = model, tok, reports, cfg
        return cache[case]
    return get


def save_both(model, tok, reports, cfg, root: Path) -> tuple[Path, Path, dict]:
    fake, packed = root / "fake", root / "packed"
    save_model(model, tok, str(fake), {}, overwrite=True)
    report: dict = {}
    save_model(model, tok, str(packed), report, overwrite=True, packed={
        "reports": reports, "nm": (cfg.prunen, cfg.prunem), "pruned": bool(cfg.sparsity or cfg.prunen)})
    return fake, packed, report


def header(folder: Path) -> dict:
    return packing.read_packed(folder)[0]


@pytest.mark.parametrize("case,mask", [("mi_sparse50", "bitmask"), ("mi_nm24", "nm"),
                                       ("gptq_w4_g32", "dense"), ("rtn_w3", "dense")])
def test_packed_logits_equal_fake_save(compressed, tmp_path, case, mask):
    from transformers import AutoModelForCausalLM
    model, tok, reports, cfg = compressed(case)
    fake, packed, report = save_both(model, tok, reports, cfg, tmp_path)
    assert not list(packed.glob("model*.safetensors*"))  # no dense copy beside the packed one
    h = header(packed)
    assert len(h["linears"]) == len(reports) and not h["dense_fallback"]
    assert {info["mask"] for info in h["linears"].values()} == {mask}
    assert any(info["perm"] for info in h["linears"].values()) == bool(cfg.mixed)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    for dtype in (CASES[case][1], torch.float32):
        a = AutoModelForCausalLM.from_pretrained(fake, dtype=dtype).eval()
        b = packing.load_packed(packed, dtype=dtype)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k  # bit for bit
        with torch.no_grad():
            assert torch.equal(a(ids).logits, b(ids).logits)
    disk = report["disk"]
    assert disk["bytes"] == sum(p.stat().st_size for p in packed.glob("packed*.safetensors*"))
    assert json.loads((packed / "compression_report.json").read_text())["disk"] == json.loads(json.dumps(disk))


def test_nm_mask_holds_on_original_columns(compressed, tmp_path):
    """The stored N:M pattern is hardware N:M: every 4 consecutive original columns keep 2."""
    model, tok, reports, cfg = compressed("mi_nm24")
    _, packed, _ = save_both(model, tok, reports, cfg, tmp_path)
    h, t = packing.read_packed(packed)
    for name, info in h["linears"].items():
        R, C = info["shape"]
        slots = packing._nm_decode(t[f"{name}.nm"], 2, 4, R, C)
        assert bool((slots.reshape(R, C // 4, 4).sum(2) == 2).all())
        W = model.get_submodule(name).weight
        assert bool(((W != 0) <= slots).all())  # every nonzero weight sits in a kept slot
        assert t[f"{name}.nm"].numel() == math.ceil(R * C // 4 * 3 / 8)  # 3 bits per 4 weights


def _rtn(W: torch.Tensor, bits: int, groupsize: int = -1, sym: bool = False):
    Q, scale, zero = rtn_quantize(W, bits, groupsize, sym)
    Q = Q * (W != 0)
    C = W.shape[1]
    g = C if groupsize <= 0 else groupsize
    return Q, {"perm": torch.arange(C), "scale": scale, "zero": zero,
               "runs": [(c, min(c + g, C), bits) for c in range(0, C, g)]}


@pytest.mark.parametrize("prune,expected_bits", [(None, 4.0), ("50%", 1 + 0.5 * 4), ("2:4", 0.75 + 0.5 * 4)])
def test_packed_size_matches_the_format(prune, expected_bits):
    """On a realistic width the per-row overhead vanishes: a 4-bit weight costs 4 bits, a 50%
    sparse one 1 (bitmask) + 0.5 * 4, a 2:4 one 3/4 (pattern index) + 0.5 * 4."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(128, 2048, generator=gen)
    nm = (0, 0)
    if prune == "50%":
        W = magnitude_prune(W, sparsity=0.5)
    elif prune == "2:4":
        nm = (2, 4)
        W = magnitude_prune(W, prunen=2, prunem=4)
    Q, qp = _rtn(W, 4)
    Q = Q.half()
    tensors, info = packing.pack_linear(Q, qp, nm)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    overhead = (4 + 1) * 8 / 2048  # fp32 scale + uint8 zero per row
    assert abs(8 * total / Q.numel() - expected_bits - overhead) < 0.01
    assert 16 / (8 * total / Q.numel()) > 0.95 * 16 / (expected_bits + overhead)
    assert torch.equal(packing.unpack_linear(tensors, info).half(), Q)


@pytest.mark.parametrize("case,packed,kept,reason", [
    ("gptq_w4_g32", True, True, None), ("rtn_w3", True, True, None), ("gptq_w4_g32", False, False, "dense save"),
    ("mi_t3.0", True, False, "permutation"), ("mi_sparse50", True, False, "pruned")])
def test_the_writer_keeps_grids_only_for_a_gptq_copy(compressed, tmp_path, case, packed, kept, reason):
    """So that host memory does not grow with the layers, the writer drops a written layer's
    qparams (scales and zeros) unless the save may still end in a GPTQ-layout copy: packed,
    unpruned, every layer so far on one GPTQ layout. The copy is written exactly where they were kept."""
    from streaming import SaveWriter
    model, tok, reports, cfg = compressed(case)
    spec = ARCHS[CASES[case][0]]
    layers = model.get_submodule(spec.layers)
    writer = SaveWriter(tmp_path / "out", len(layers), spec, CASES[case][1],
                        {"nm": (cfg.prunen, cfg.prunem), "pruned": bool(cfg.sparsity or cfg.prunen)} if packed else None)
    for i, layer in enumerate(layers):
        prefix = f"{spec.layers}.{i}."
        writer.write_layer(i, layer.state_dict(), {n[len(prefix):]: r for n, r in reports.items() if n.startswith(prefix)})
        assert {r.qparams is not None for r in writer.reports.values()} == {kept}
    assert all(r.qparams is not None for r in reports.values())  # the caller's reports are left as they were
    report: dict = {}
    writer.finish(model, tok, report)
    if packed:
        gptq = report["disk"]["gptq"]
        assert gptq["written"] == kept and (reason is None or reason in gptq["reason"])
    else:
        assert writer.gptq_reason == reason


def test_reports_can_leave_their_grids_behind(compressed, tiny_models, text_files):
    """compress_model(keep_qparams=False), as the CLI runs it: the same figures, no grids."""
    from datautils import get_loaders
    _, tok, reports, cfg = compressed("mi_t3.0")
    model = load_model(str(tiny_models["llama"]), torch.float32, False)
    windows = get_loaders(str(text_files["calib"]), tok, 4, 0, 32)
    lean = compress_model(model, ARCHS["llama"], cfg, windows, torch.device("cpu"), torch.float32,
                          lambda msg: None, keep_qparams=False).reports
    assert lean.keys() == reports.keys() and all(r.qparams is None for r in lean.values())
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    assert all(strip(lean[n].to_json()) == strip(r.to_json()) for n, r in reports.items())


def test_off_grid_weight_is_stored_dense_and_still_exact(compressed, tmp_path):
    model, tok, reports, cfg = compressed("rtn_w3")
    model = copy.deepcopy(model)
    name = "model.layers.1.mlp.up_proj"
    model.get_submodule(name).weight.data[3, 5] += 1e-3  # no longer on its 3-bit grid
    assert packing.codes_of(model.get_submodule(name).weight.data, reports[name].qparams) is None
    with pytest.warns(UserWarning, match="off their grid"):
        disk = packing.save_packed(model, tmp_path, tok, reports)
    assert disk["dense_fallback"] == [name]
    assert disk["gptq"]["written"] is False
    rebuilt = packing.load_packed(tmp_path, dtype=torch.float16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k


def test_loader_one_liner(compressed, tmp_path):
    model, tok, reports, cfg = compressed("mi_sparse50")
    _, packed, _ = save_both(model, tok, reports, cfg, tmp_path)
    code = (f"import packing; m = packing.load_packed({str(packed)!r}); "
            "print(m.dtype, m.config.model_type, sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["torch.float16", "llama"]
    assert int(out.stdout.split()[2]) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- GPTQ layout, decoded from its definition
def unpack_gptq_words(words: np.ndarray, bits: int) -> np.ndarray:
    """(n_words, cols) int32 -> (n_words * 32 / bits, cols) codes: values packed along the first
    dimension, value k of a 32-bit word at bits [k*bits, (k+1)*bits); at 3 bits every 3 words hold
    32 values, value 10 split as 2 low bits at the top of word 0 and 1 high bit at the bottom of
    word 1, value 21 as 1 low bit at the top of word 1 and 2 high bits at the bottom of word 2."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        mask = (1 << bits) - 1
        vals = [(u >> (bits * k)) & mask for k in range(32 // bits)]
        return np.stack(vals, 1).reshape(-1, u.shape[1])
    assert bits == 3
    w0, w1, w2 = u[0::3], u[1::3], u[2::3]
    vals = [(w0 >> (3 * k)) & 7 for k in range(10)]
    vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    vals += [(w1 >> (3 * k + 1)) & 7 for k in range(10)]
    vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    vals += [(w2 >> (3 * k + 2)) & 7 for k in range(10)]
    return np.stack(vals, 1).reshape(-1, u.shape[1])


def decode_gptq(t: dict, bits: int, v2: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """codes (out, in), zeros (out, in), fp16 scales (out, in) and the dequantized weight."""
    q = unpack_gptq_words(t["qweight"].numpy(), bits).T  # (out, in)
    z = unpack_gptq_words(t["qzeros"].numpy().T, bits)  # (out, n_groups): packed along the output dim
    z = z + (0 if v2 else 1)  # v1 stores zero - 1
    g = t["g_idx"].numpy().astype(np.int64)
    s = t["scales"].numpy()  # (n_groups, out) fp16
    Z, S = z[:, g], s.T[:, g]
    return q, Z, S, S.astype(np.float32) * (q - Z).astype(np.float32)


@pytest.mark.parametrize("case,bits,group_size", [("gptq_w4_g32", 4, 32), ("rtn_w3", 3, -1)])
def test_gptq_copy_decodes_to_the_fake_weights(compressed, tmp_path, case, bits, group_size):
    model, tok, reports, cfg = compressed(case)
    fake, packed, report = save_both(model, tok, reports, cfg, tmp_path)
    assert report["disk"]["gptq"]["written"]
    qc = json.loads((packed / "gptq" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (bits, group_size, False, False)
    assert json.loads((packed / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    t = saved_tensors(packed / "gptq")
    dense = saved_tensors(fake)
    v2 = qc["checkpoint_format"] == "gptq_v2"
    for name, rep in reports.items():
        parts = {k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        R, C = rep.shape
        assert parts["qweight"].shape == (C * bits // 32, R) and parts["qweight"].dtype == torch.int32
        assert parts["scales"].dtype == torch.float16 and parts["g_idx"].dtype == torch.int32
        q, Z, S, Wd = decode_gptq(parts, bits, v2)
        W = dense[f"{name}.weight"].float()
        # the grid: fp32 scale and integer zero of the solver, one per (row, group)
        g = np.arange(C) // (C if group_size < 0 else group_size)
        scale32 = rep.qparams["scale"].numpy()[:, g]
        zero = rep.qparams["zero"].numpy()[:, g]
        assert np.array_equal(Z, zero)
        assert np.array_equal(S, scale32.astype(np.float16))
        assert q.min() >= 0 and q.max() < 2 ** bits
        exact = torch.from_numpy(scale32 * (q - zero).astype(np.float32)).to(dense[f"{name}.weight"].dtype)
        assert torch.equal(exact, dense[f"{name}.weight"])  # the codes are exactly the fake weights
        assert np.allclose(Wd, W.numpy(), rtol=2e-3, atol=1e-6)  # with fp16 scales, as kernels decode
    for k, v in dense.items():  # everything else is stored as it was
        if k.rsplit(".", 1)[0] not in reports:
            assert torch.equal(t[k], v), k


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_packing_all_widths(bits, sym):
    gen = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 256, generator=gen)
    Q, qp = _rtn(W, bits, 64, sym)
    t = packing.gptq_tensors(Q, qp, bits, 64)
    q, Z, S, _ = decode_gptq(t, bits, v2=False)
    g = np.arange(256) // 64
    assert np.array_equal(Z, qp["zero"].numpy()[:, g])
    exact = qp["scale"].numpy()[:, g] * (q - Z).astype(np.float32)
    assert np.array_equal(exact, Q.numpy())


def test_gptq_zero_point_zero_is_written_as_v2(compressed, tmp_path):
    """A row with no negative weight has zero point 0, which v1's zero - 1 cannot hold."""
    model, tok, reports, cfg = compressed("rtn_w3")
    model, reports = copy.deepcopy(model), dict(reports)
    name = "model.layers.0.self_attn.q_proj"
    W = model.get_submodule(name).weight.data.float()
    W[0] = W[0].abs()
    Q, qp = _rtn(W, 3)
    assert float(qp["zero"][0, 0]) == 0
    model.get_submodule(name).weight.data = Q.half()
    reports[name] = dataclasses.replace(reports[name], qparams=qp)
    with pytest.warns(UserWarning, match="gptq_v2"):
        out = packing.save_gptq(model, tmp_path, reports)
    assert out["checkpoint_format"] == "gptq_v2"
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "model.safetensors"))
    q, Z, _, _ = decode_gptq({k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 3, v2=True)
    assert np.array_equal(Z, qp["zero"].numpy().repeat(W.shape[1], 1))
    exact = torch.from_numpy(qp["scale"].numpy() * (q - Z).astype(np.float32)).half()
    assert torch.equal(exact, Q.half())


def test_no_gptq_copy_for_mixed_or_pruned(compressed, tmp_path):
    for case, reason in (("mi_sparse50", "pruned"), ("mi_nm24", "pruned")):
        model, tok, reports, cfg = compressed(case)
        disk = packing.save_packed(model, tmp_path / case, tok, reports, nm=(cfg.prunen, cfg.prunem), pruned=True)
        assert not disk["gptq"]["written"] and reason in disk["gptq"]["reason"]
        assert not (tmp_path / case / "gptq").exists()
        assert "permutation" in packing.gptq_group_size(reports)
