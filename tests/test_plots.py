"""--plot figures and the --log_json progress log, through the CLI and on synthetic reports."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import events
import plots
import vicuna_mi as vm
from config import LinearReport

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> None:
    import matplotlib.image as mpimg
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    img = mpimg.imread(str(path))
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert float(img[..., :3].std()) > 0.05  # something was drawn


def _reports(widths: dict[tuple[int, str], list[int]], C: int = 8) -> dict:
    """Synthetic reports: (layer, linear) -> widths of clusters of C // len(widths) channels."""
    out = {}
    for (i, name), bits in widths.items():
        size = C // len(bits)
        groups = [{"bits": b, "channels": list(range(k * size, (k + 1) * size))} for k, b in enumerate(bits)]
        avg = sum(bits) / len(bits)
        out[f"model.layers.{i}.{name}"] = LinearReport(shape=[4, C], sparsity=0.0, avg_bits=avg,
                                                       effective_bits=avg, loss=0.0, seconds=0.0, groups=groups)
    return out


def test_bits_grid_and_fractions():
    reps = _reports({(0, "self_attn.q_proj"): [2, 4], (0, "mlp.down_proj"): [4, 4],
                     (1, "self_attn.q_proj"): [8, 8]})
    layers, names, grid = plots.bits_grid(reps)
    assert layers == [0, 1] and names == ["self_attn.q_proj", "mlp.down_proj"]
    assert grid[0].tolist() == [3.0, 4.0] and grid[1, 0] == 8.0 and np.isnan(grid[1, 1])
    widths, frac = plots.width_fractions(reps, layers)
    assert widths == [2, 4, 8]
    assert np.allclose(frac, [[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])


def test_mi_plot_orders_channels_by_cluster(tmp_path):
    """Two interleaved clusters: ordered by cluster the matrix is block diagonal."""
    C = 64
    label = np.arange(C) % 2
    mi = np.where(label[:, None] == label[None, :], 1.0, 0.01)
    groups = [{"bits": 4, "channels": np.nonzero(label == g)[0].tolist()} for g in (0, 1)]
    M, bounds = plots.ordered_mi(mi, groups)
    assert bounds.tolist() == [32]
    assert np.nanmin(M[:32, :32]) == 1.0 and np.nanmin(M[32:, 32:]) == 1.0 and M[:32, 32:].max() == 0.01
    assert np.isnan(np.diag(M)).all()
    path = plots.plot_mi(mi, {"q_proj": groups, "k_proj": [dict(g, bits=3) for g in groups]}, tmp_path / "mi.png")
    _png_ok(path)
    assert plots.block_mean(np.ones((1000, 1000)), 512).shape == (500, 500)


def test_no_mi_figure_without_mi(tmp_path):
    reps = _reports({(0, "self_attn.q_proj"): [4], (1, "self_attn.q_proj"): [4]})
    written = plots.write_plots(tmp_path, reps, None, mi_linears=("self_attn.q_proj",))
    assert [p.name for p in written] == ["bits.png"]
    _png_ok(written[0])


@pytest.mark.parametrize("event,line", [
    ({"event": "linear", "layer": 3, "linear": "self_attn.q_proj", "loss": 0.012, "sparsity": 0.5, "bits": 3.5,
      "seconds": 0.8}, "layer 3 self_attn.q_proj  loss 1.200e-02  sparsity 0.500  bits 3.50  0.8s"),
    ({"event": "linear", "layer": 0, "linear": "mlp.up_proj", "loss": None, "sparsity": 0.0, "bits": 4.0,
      "seconds": 0.0}, "layer 0 mlp.up_proj  sparsity 0.000  bits 4.00  0.0s"),
    ({"event": "mi", "layer": 1, "linears": ["q_proj", "k_proj", "v_proj"], "mi_mean": 0.0128, "mi_max": 0.183,
      "mi_frac_above_0.1": 0.003, "groups": 4, "seconds": 1.7},
     "layer 1 q_proj/k_proj/v_proj  MI mean 0.0128  max 0.183  >0.1 0.003  groups 4  grouping 1.70s"),
    ({"event": "layer", "layer": 1, "seconds": 9.7, "done": 2, "total": 2, "eta": 0.0},
     "layer 1 done in 9.7s  [2/2, eta 0s]"),
    ({"event": "layer", "layer": 0, "seconds": 2.25, "done": 1, "total": 32, "eta": 70.2, "host_gib": 1.5,
      "host_peak_gib": 2.625, "gpu_peak_gib": 7.41},
     "layer 0 done in 2.2s  [1/32, eta 70s]  host 1.50 GiB (peak 2.62)  GPU peak 7.41 GiB"),
    ({"event": "resumed", "folder": "/w", "restored": 2, "total": 5}, "resumed from /w: layers 0..1 restored, 3 to go"),
    ({"event": "warning", "text": "layer 1 mlp.gate_proj reaches 3.328 bits"},
     "warning: layer 1 mlp.gate_proj reaches 3.328 bits"),
    ({"event": "message", "text": "something else"}, "something else"),
    ({"event": "under_target", "layer": 1, "linear": "mlp.up_proj", "bits": 3.9, "target": 4.0}, None),
])
def test_format_line(event, line):
    assert events.format_line(event) == line


def test_json_log_is_strict_json_and_flushed(tmp_path):
    path = tmp_path / "log.jsonl"
    log = events.JsonLog(path)
    log.write({"event": "layer", "layer": 0, "seconds": 1.0, "done": 1, "total": 2, "eta": 1.0})
    assert json.loads(path.read_text())["event"] == "layer"  # readable before close
    log.event("eval", dataset="x", ppl=float("nan"), t_=torch.tensor([1, 2]))
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["done"] == 1 and lines[0]["t"] >= 0
    assert lines[1]["ppl"] is None and lines[1]["t_"] == [1, 2]
    events.JsonLog(None).write({"event": "layer"})  # no path: nothing written, no error


def test_cli_plot_log_json_and_packed_save(tiny_models, text_files, tmp_path):
    out, fig, log = tmp_path / "model", tmp_path / "fig", tmp_path / "run.jsonl"
    rc = vm.main([str(tiny_models["llama"]), str(text_files["calib"]), "--device", "cpu", "--nsamples", "4",
                  "--seqlen", "32", "--wbits", "4", "--target_avg_bits", "3.5", "--n_groups", "4",
                  "--sparsity", "0.5", "--eval", str(text_files["eval"]), "--eval_windows", "2",
                  "--save", str(out), "--save_format", "packed", "--plot", str(fig), "--log_json", str(log)])
    assert rc == 0
    for name in ("bits.png", "mi.png"):
        _png_ok(fig / name)
    events = [json.loads(x) for x in log.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert all(a["t"] <= b["t"] for a, b in zip(events, events[1:]))
    report = json.loads((out / "compression_report.json").read_text())
    linears = [e for e in events if e["event"] == "linear"]
    assert sorted(f"model.layers.{e['layer']}.{e['linear']}" for e in linears) == sorted(report["linears"])
    for e in linears:
        r = report["linears"][f"model.layers.{e['layer']}.{e['linear']}"]
        assert e["bits"] == pytest.approx(r["avg_bits"], abs=0.005)
        assert e["sparsity"] == pytest.approx(r["sparsity"], abs=0.0005)
    assert [e["layer"] for e in events if e["event"] == "layer"] == [0, 1]
    for e in (e for e in events if e["event"] == "layer"):  # this process's memory, as the OS reports it
        assert 0.05 < e["host_gib"] <= e["host_peak_gib"] < 64 and "gpu_peak_gib" not in e  # CPU run
    assert len([e for e in events if e["event"] == "mi"]) == 8  # 4 shared-input sets x 2 layers
    (ev,) = [e for e in events if e["event"] == "eval"]
    assert ev["ppl"] == pytest.approx(report["ppl"][str(text_files["eval"])])
    (saved,) = [e for e in events if e["event"] == "saved"]
    assert saved["disk"]["bytes"] == report["disk"]["bytes"] == sum(p.stat().st_size for p in out.glob("packed*.safetensors*"))
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
