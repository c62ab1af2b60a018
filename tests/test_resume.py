"""Long runs that survive faults: per-layer checkpoints and --resume (a run killed after layer k
and resumed saves bitwise the same model as an uninterrupted one), the work folder's life
cycle, NaN/inf stops with a one-line error, weights_only loading of .bin checkpoints,
trust_remote_code off by default, and logs free of carriage-return progress bars."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import one_error_line, run_cli, saved_tensors, saved_weights_file

FLAGS = ["--device", "cpu", "--nsamples", "4", "--seqlen", "64", "--sparsity", "0.5", "--wbits", "4",
         "--target_avg_bits", "3.5", "--n_groups", "4", "--eval", "none"]


def tensors(folder: Path) -> dict:
    return saved_tensors(folder)


def linears_without_timing(folder: Path) -> dict:
    rep = json.loads((folder / "compression_report.json").read_text())["linears"]
    return {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in rep.items()}


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    """The tiny llama of conftest with 4 decoder layers, so that 'killed after layer 1, resumed at
    layer 2' leaves work on both sides."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from conftest import make_tokenizer
    path = tmp_path_factory.mktemp("llama4") / "llama4"
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(llama4, text_files, tmp_path_factory):
    save = tmp_path_factory.mktemp("full") / "out"
    proc = run_cli([str(llama4), str(text_files["calib"]), *FLAGS, "--save", str(save)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return save, proc


def test_uninterrupted_run_cleans_up_and_logs_plain_lines(uninterrupted):
    save, proc = uninterrupted
    assert saved_weights_file(save).is_file()
    assert not Path(f"{save}.work").exists(), "a finished run removes its work folder"
    assert sorted(p.name for p in save.parent.iterdir()) == ["out"]
    out = proc.stdout + proc.stderr
    assert "\r" not in out, "no carriage-return progress bars in a non-interactive log"
    assert "Loading weights" not in out and "Writing model" not in out
    done = [ln for ln in proc.stdout.splitlines() if " done in " in ln]
    assert [ln.split()[1] for ln in done] == ["0", "1", "2", "3"]
    assert all("eta" in ln and f"[{i + 1}/4," in ln for i, ln in enumerate(done))


def test_killed_after_layer_1_resumes_bitwise(llama4, text_files, uninterrupted, tmp_path):
    full, _ = uninterrupted
    save = tmp_path / "out"
    work = tmp_path / "out.work"
    argv = [str(llama4), str(text_files["calib"]), *FLAGS, "--save", str(save)]

    crashed = run_cli(argv, crash_after=1)
    assert crashed.returncode == 17, crashed.stdout + crashed.stderr
    assert not save.exists()
    # every finished layer's weights, only the latest activations, no temporary files
    assert sorted(p.name for p in work.iterdir()) == ["acts_0001.safetensors", "fingerprint.json",
                                                      "layer_0000.pt", "layer_0001.pt"]

    resumed = run_cli(argv + ["--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "layers 0..1 restored" in resumed.stdout
    done = [ln.split()[1] for ln in resumed.stdout.splitlines() if " done in " in ln]
    assert done == ["2", "3"], "layers 0 and 1 come from the checkpoints, not recomputed"
    assert not work.exists(), "the work folder goes once the save succeeded"

    a, b = tensors(full), tensors(save)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert __import__("torch").equal(a[k], b[k]), f"{k} differs after resume"
    assert linears_without_timing(full) == linears_without_timing(save)


def test_packed_save_after_resume_matches(tiny_models, text_files, tmp_path):
    """Packed saves read the restored reports' qparams (perm, runs, scale, zero). The crashed run
    streamed its layers; the resumed one loads the model whole and keeps the activations in host
    memory (--max_gpu_memory): neither changes the result, so both may differ between the runs."""
    argv = [str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS, "--save_format", "packed"]
    full = run_cli(argv + ["--save", str(tmp_path / "full")])
    assert full.returncode == 0, full.stdout + full.stderr
    assert run_cli(argv + ["--save", str(tmp_path / "res")], crash_after=0).returncode == 17
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".res.tmp-")], "the crash left its partial save"
    resumed = run_cli(argv + ["--save", str(tmp_path / "res"), "--resume", "--no_stream", "--max_gpu_memory", "1e-4"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "layers 0..0 restored" in resumed.stdout
    import packing
    (ha, a), (hb, b) = packing.read_packed(tmp_path / "full"), packing.read_packed(tmp_path / "res")
    assert ha == hb
    assert a.keys() == b.keys() and all(__import__("torch").equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "res"]


@pytest.fixture
def crashed_after_layer_0(tiny_models, text_files, tmp_path):
    argv = [str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS, "--save", str(tmp_path / "out")]
    proc = run_cli(argv, crash_after=0)
    assert proc.returncode == 17, proc.stdout + proc.stderr
    work = tmp_path / "out.work"
    return argv, work, {p.name: p.read_bytes() for p in work.iterdir()}


def test_resume_with_other_flags_is_refused(crashed_after_layer_0):
    argv, work, before = crashed_after_layer_0
    i = argv.index("--sparsity")
    other = argv[:i + 1] + ["0.6"] + argv[i + 2:]
    msg = one_error_line(run_cli(other + ["--resume"]), 2)
    assert "sparsity" in msg and "0.5" in msg and "0.6" in msg and "without --resume" in msg
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before, "a refused resume leaves the checkpoints"
    assert not (work.parent / "out").exists()


def test_rerun_without_resume_clears_old_work_folder(crashed_after_layer_0):
    argv, work, _ = crashed_after_layer_0
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clearing the work folder" in proc.stdout
    assert [ln.split()[1] for ln in proc.stdout.splitlines() if " done in " in ln] == ["0", "1"]
    assert not work.exists() and saved_weights_file(work.parent / "out").is_file()


def test_resume_needs_save_or_work_dir(tiny_models, text_files):
    msg = one_error_line(run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS, "--resume"]), 2)
    assert "--resume" in msg and "--work_dir" in msg


def test_no_checkpoint_writes_no_work_folder(tiny_models, text_files, tmp_path):
    out = tmp_path / "out"
    argv = [str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS, "--save", str(out), "--no_checkpoint"]
    proc = run_cli(argv, crash_after=0)  # the crash hook sits in the checkpointer: never reached
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert saved_weights_file(out).is_file() and not (tmp_path / "out.work").exists()
    msg = one_error_line(run_cli(argv + ["--resume"]), 2)
    assert "--no_checkpoint" in msg


def test_work_dir_without_save(tiny_models, text_files, tmp_path):
    work = tmp_path / "ckpt"
    argv = [str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS, "--work_dir", str(work)]
    assert run_cli(argv, crash_after=0).returncode == 17
    assert (work / "layer_0000.pt").is_file()
    proc = run_cli(argv + ["--resume"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "layers 0..0 restored" in proc.stdout and not work.exists()


def test_foreign_work_dir_is_left_alone(tiny_models, text_files, tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("user data")
    msg = one_error_line(run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS, "--work_dir", str(work)]),
                     2)
    assert "not a checkpoint folder" in msg
    assert [p.name for p in work.iterdir()] == ["notes.txt"]


def test_checkpoint_files_load_weights_only(tiny_models, text_files, tmp_path):
    """Layer checkpoints hold only dicts, lists, numbers and tensors: torch.load(weights_only=True) reads
    them; the activations are a plain safetensors file."""
    import torch
    argv = [str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS, "--work_dir", str(tmp_path / "w")]
    assert run_cli(argv, crash_after=0).returncode == 17
    d = torch.load(tmp_path / "w" / "layer_0000.pt", weights_only=True)
    assert set(d["state"]) >= {"self_attn.q_proj.weight", "mlp.down_proj.weight"}
    assert all(not k.startswith("model.") for k in d["state"]), "one layer's parameters only"
    qp = d["reports"]["self_attn.q_proj"]["qparams"]
    assert {"perm", "runs", "scale", "zero"} <= set(qp) and isinstance(qp["scale"], torch.Tensor)
    from safetensors.torch import load_file
    acts = load_file(tmp_path / "w" / "acts_0000.safetensors")["acts"]
    assert acts.shape == (4, 64, 64) and acts.dtype == torch.float32


# ---------------------------------------------------------------- NaN/inf stops (in process)
@pytest.fixture
def in_process(monkeypatch):
    """main() sets process-wide state (grad mode, warning filters, progress bars, a default
    CUDA_VISIBLE_DEVICES): restore it."""
    import warnings
    import torch
    from transformers.utils import logging as hf_logging
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    grad, bars = torch.is_grad_enabled(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        yield
    torch.set_grad_enabled(grad)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def poisoned_copy(src: Path, dst: Path, key: str, value: float) -> Path:
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    sd[key][0, 0] = value
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_model_weights_stop_naming_layer_and_linear(value, tiny_models, text_files, tmp_path, capsys,
                                                             in_process):
    import vicuna_mi
    model = poisoned_copy(tiny_models["llama"], tmp_path / "bad", "model.layers.1.self_attn.q_proj.weight", value)
    assert vicuna_mi.main([str(model), str(text_files["calib"]), *FLAGS]) == 1
    msg = one_error(capsys)
    assert "layer 1 self_attn.q_proj" in msg and "NaN/inf" in msg and "--dtype" in msg


def test_nonfinite_solver_output_stops_naming_layer_and_linear(tiny_models, text_files, capsys, monkeypatch,
                                                              in_process):
    import sparsegpt_mi
    import vicuna_mi
    solve, calls = sparsegpt_mi.LinearSolver.solve, []

    def poisoned(self, *a, **k):
        results = solve(self, *a, **k)
        calls.append(1)
        if len(calls) == 7:  # layer 1 (4 solves per layer), its third group: gate_proj/up_proj
            results[1].weight[0, 0] = float("nan")
        return results

    monkeypatch.setattr(sparsegpt_mi.LinearSolver, "solve", poisoned)
    assert vicuna_mi.main([str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS]) == 1
    msg = one_error(capsys)
    assert "layer 1 mlp.up_proj" in msg and "--percdamp" in msg and "--nsamples" in msg


def test_nonfinite_layer_outputs_stop_naming_layer(tiny_models, text_files, capsys, monkeypatch, in_process):
    import layerwise
    import vicuna_mi
    run_layer, calls = layerwise.run_layer, []

    def poisoned(layer, inps, outs, kwargs, batch):
        run_layer(layer, inps, outs, kwargs, batch)
        if outs is not None:
            calls.append(1)
            if len(calls) == 2:  # layer 1's outputs
                outs[0, 0, 0] = float("inf")

    monkeypatch.setattr(layerwise, "run_layer", poisoned)
    assert vicuna_mi.main([str(tiny_models["llama"]), str(text_files["calib"]), *FLAGS]) == 1
    msg = one_error(capsys)
    assert "layer 1" in msg and "outputs" in msg and "--percdamp" in msg and "--nsamples" in msg


# ---------------------------------------------------------------- loading safety
def test_bin_checkpoint_loads_weights_only(tiny_models, text_files, tmp_path):
    """A .bin whose pickle would call a function is refused (exit 2, one line) and the call never runs."""
    import torch
    from safetensors.torch import load_file
    model = tmp_path / "bin"
    shutil.copytree(tiny_models["llama"], model)
    sd = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "PAYLOAD_RAN"
    sd["extra"] = _Payload(str(marker))
    torch.save(sd, model / "pytorch_model.bin")
    proc = run_cli([str(model), str(text_files["calib"]), "--device", "cpu", "--rtn", "--wbits", "4",
                    "--seqlen", "64", "--eval", "none"])
    msg = one_error_line(proc, 2)
    assert "weights_only" in msg and "safetensors" in msg
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_remote_code_runs_only_with_the_flag(tiny_models, text_files, tmp_path):
    model = tmp_path / "remote"
    shutil.copytree(tiny_models["llama"], model)
    code = ("import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('ran')\n"
            "from transformers import LlamaConfig\nclass RemoteConfig(LlamaConfig):\n    pass\n")
    (model / "configuration_remote.py").write_text(code)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_remote.RemoteConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    argv = [str(model), str(text_files["calib"]), "--device", "cpu", "--rtn", "--wbits", "4", "--seqlen", "64",
            "--eval", "none"]
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = run_cli(argv, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (model / "IMPORTED").exists(), "model code ran without --trust_remote_code"
    run_cli(argv + ["--trust_remote_code"], env=env)  # the folder's code is real: the flag lets it run
    assert (model / "IMPORTED").exists() or any((tmp_path / "modules").rglob("IMPORTED"))
