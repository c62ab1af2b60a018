"""Save and reload: the CLI's saved folder loads with plain transformers and gives exactly the
logits of the model compressed in memory; the report says what was done."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vicuna_mi as vm
from helpers import saved_tensors
from compress import compress_model
from layerwise import perplexity
from model_io import ARCHS, load_config, load_model, load_tokenizer, save_model
from datautils import get_eval_tokens, get_loaders

ROOT = Path(__file__).resolve().parents[1]
TARGET = 3.5
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
REPORT_KEYS = {"config", "versions", "avg_bits", "sparsity", "ppl", "seconds", "linears"}
LINEAR_KEYS = {"shape", "sparsity", "avg_bits", "loss", "seconds", "groups"}


def cli_args(model: Path, text: dict, save: Path) -> list[str]:
    return [str(model), str(text["calib"]), "--device", "cpu", "--nsamples", "4", "--seqlen", "64",
            "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", str(TARGET), "--n_groups", "4",
            "--eval", str(text["eval"]), "--eval_windows", "4", "--save", str(save)]


def compress_in_process(argv: list[str]):
    """What main() does, step by step, keeping the model in memory."""
    args = vm.build_parser().parse_args(argv)
    vm.validate(args)
    cfg = vm.config_from_args(args)
    torch.manual_seed(args.seed)
    dev, dtype = torch.device("cpu"), torch.float32
    model_cfg = load_config(args.model, False)
    spec = ARCHS[model_cfg.model_type]
    tok = load_tokenizer(args.model, False)
    model = load_model(args.model, dtype, False)
    windows = get_loaders(args.dataset, tok, args.nsamples, args.seed, args.seqlen)
    reports = compress_model(model, spec, cfg, windows, dev, dtype, lambda msg: None, args.fwd_batch).reports
    return args, spec, tok, model, reports


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_save_reload_matches_memory(arch, tiny_models, text_files, tmp_path):
    from transformers import AutoModelForCausalLM
    cli_dir, mem_dir = tmp_path / "cli", tmp_path / "mem"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "vicuna_mi.py"), *cli_args(tiny_models[arch], text_files, cli_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    args, spec, tok, model, reports = compress_in_process(cli_args(tiny_models[arch], text_files, mem_dir))
    save_model(model, tok, str(mem_dir), {"config": vars(args), "linears": {}}, overwrite=False)

    ids = get_eval_tokens(str(text_files["eval"]), tok, 64)[:, :128]  # (1, 128)
    with torch.no_grad():
        expected = model(ids).logits
        for folder in (cli_dir, mem_dir):
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            reloaded.eval()
            got = reloaded(ids).logits
            assert got.dtype == torch.float32
            assert torch.equal(got, expected), f"{folder.name}: max diff {(got - expected).abs().max():.3g}"
    # the subprocess and the in-process run compressed bit for bit the same
    saved = saved_tensors(cli_dir)
    state = model.state_dict()
    for name, t in saved.items():
        assert torch.equal(t, state[name]), name

    check_report(json.loads((cli_dir / "compression_report.json").read_text()), model, saved, spec, tok, text_files)


def check_report(report: dict, model, saved: dict, spec, tok, text_files) -> None:
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    cfg = report["config"]
    assert cfg["sparsity"] == 0.5 and cfg["target_avg_bits"] == TARGET and cfg["n_groups"] == 4
    assert {"torch", "transformers", "python"} <= set(report["versions"])
    assert report["versions"]["torch"] == torch.__version__
    assert report["seconds"] > 0
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert TARGET - 0.25 <= report["avg_bits"] <= TARGET + 0.01
    n_layers = model.config.num_hidden_layers
    names = {f"{spec.layers}.{i}.{n}" for i in range(n_layers) for n in LINEARS}
    assert set(report["linears"]) == names
    for name, rep in report["linears"].items():
        assert LINEAR_KEYS <= set(rep), name
        W = saved[name + ".weight"]
        out_f, in_f = W.shape
        assert rep["shape"] == [out_f, in_f]
        chans = sorted(c for g in rep["groups"] for c in g["channels"])
        assert chans == list(range(in_f)), f"{name}: groups do not partition the input channels"
        assert 1 <= len(rep["groups"]) <= 4
        bits = [g["bits"] for g in rep["groups"]]
        assert all(2 <= b <= 8 for b in bits)
        avg = sum(g["bits"] * len(g["channels"]) for g in rep["groups"]) / in_f
        assert rep["avg_bits"] == pytest.approx(avg)
        assert rep["avg_bits"] <= TARGET + 0.01
        assert rep["sparsity"] == pytest.approx(0.5)
        assert math.isfinite(rep["loss"]) and rep["loss"] >= 0 and rep["seconds"] >= 0
        # the saved weights: half of each row pruned, each (row, group) on a 2^bits grid
        assert torch.all((W == 0).sum(1) >= in_f // 2), name
        for g in rep["groups"]:
            block = W[:, g["channels"]]
            assert max(torch.unique(r).numel() for r in block) <= 2 ** g["bits"], name
    # the report's perplexity is the saved model's
    ppl = report["ppl"][str(text_files["eval"])]
    assert math.isfinite(ppl) and 1 < ppl < 10 * model.config.vocab_size
    tokens = get_eval_tokens(str(text_files["eval"]), tok, 64)
    again = perplexity(model, spec, tokens, 64, torch.device("cpu"), torch.float32, 4)
    assert again == pytest.approx(ppl, rel=1e-6)
