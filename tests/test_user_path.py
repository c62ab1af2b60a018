"""The path a new user takes through the CLI, offline on the CPU: data that cannot be had stops
the run before anything is computed or written, the compressed model is saved before it is
evaluated, --overwrite never deletes what the tool did not write, Ctrl-C says how to resume,
repeated warnings are summed up once, the save keeps the checkpoint's dtype, and a run
without compression flags only evaluates."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from helpers import ROOT, cli_command, one_error_line, run_cli, saved_tensors, saved_weights_file

QUICK = ["--device", "cpu", "--nsamples", "4", "--seqlen", "64"]
MI = ["--wbits", "4", "--target_avg_bits", "3.5", "--n_groups", "4"]


def test_unavailable_eval_set_stops_before_compressing(tiny_models, text_files, tmp_path):
    save, log = tmp_path / "out", tmp_path / "logs" / "run.jsonl"
    tick = time.perf_counter()
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, *MI, "--eval", "wikitext2",
                    "--save", str(save), "--log_json", str(log)])
    msg = one_error_line(proc, 2)
    assert "wikitext" in msg and "local" in msg
    assert time.perf_counter() - tick < 60
    assert "layer 0" not in proc.stdout, "nothing was compressed"
    assert sorted(tmp_path.iterdir()) == [], "nothing was written: no save, no work folder, no log"


def test_saved_before_evaluation_fails(tiny_models, text_files, tmp_path):
    """An evaluation that fails (here: a text shorter than one window) loses nothing."""
    short = tmp_path / "short.txt"
    short.write_text("the model of the layer.")
    save = tmp_path / "out"
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, *MI, "--eval", str(short),
                    "--save", str(save)])
    msg = one_error_line(proc, 2)
    assert "fewer than one window" in msg
    assert saved_weights_file(save).is_file() and (save / "config.json").is_file()
    report = json.loads((save / "compression_report.json").read_text())
    assert len(report["linears"]) == 14 and report["ppl"] == {}
    assert not (tmp_path / "out.work").exists(), "the checkpoints went once the model was saved"


# ---------------------------------------------------------------- --overwrite
def test_overwrite_refuses_foreign_files_before_compressing(tiny_models, text_files, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "notes.txt").write_text("user data")
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, *MI, "--eval", "none",
                    "--save", str(save), "--overwrite"])
    msg = one_error_line(proc, 2)
    assert "notes.txt" in msg and "did not write" in msg
    assert "layer 0" not in proc.stdout
    assert [p.name for p in save.iterdir()] == ["notes.txt"] and (save / "notes.txt").read_text() == "user data"


def test_overwrite_replaces_an_earlier_save_only(tiny_models, text_files, tmp_path):
    save = tmp_path / "out"
    argv = [str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, "--eval", "none", "--save", str(save)]
    first = run_cli(argv + ["--wbits", "4", "--target_avg_bits", "4.0", "--no_checkpoint"])
    assert first.returncode == 0, first.stdout + first.stderr
    listed = json.loads((save / "compression_report.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in save.iterdir())
    again = run_cli(argv + ["--wbits", "4", "--target_avg_bits", "3.0", "--overwrite", "--no_checkpoint"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((save / "compression_report.json").read_text())["config"]["target_avg_bits"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary or old folder left"
    (save / "mine.txt").write_text("added by the user")
    third = run_cli(argv + ["--wbits", "4", "--overwrite", "--no_checkpoint"])
    assert "mine.txt" in one_error_line(third, 2)
    assert (save / "mine.txt").read_text() == "added by the user"


# ---------------------------------------------------------------- Ctrl-C, --resume
def test_ctrl_c_says_how_to_resume(tmp_path, text_files, tiny_models):
    save = tmp_path / "out"
    argv, env = cli_command([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, *MI, "--eval", "none",
                             "--save", str(save)], pause_before=1)
    # a child started from a background job inherits SIGINT ignored, and Python then never turns it
    # into KeyboardInterrupt: give the run the terminal's default, as a user's Ctrl-C finds it
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.strip() == "paused":
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted after layer 1 of 2"), err
    assert "--resume" in lines[0]
    assert (tmp_path / "out.work" / "layer_0000.pt").is_file() and not save.exists()
    resumed = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, *MI, "--eval", "none",
                       "--save", str(save), "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "layers 0..0 restored" in resumed.stdout


def test_resume_without_checkpoints_says_so(tiny_models, text_files, tmp_path):
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, *MI, "--eval", "none",
                    "--save", str(tmp_path / "out"), "--resume"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum("no finished layer" in ln and "starting from layer 0" in ln for ln in proc.stdout.splitlines()) == 1


# ---------------------------------------------------------------- output
def test_under_target_warnings_summed_up_once(tiny_models, text_files, tmp_path):
    """4 clusters of 64 or 128 channels cannot average 3.3 bits: every linear ends at least 0.01 under."""
    log = tmp_path / "run.jsonl"
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, "--wbits", "4",
                    "--target_avg_bits", "3.3", "--n_groups", "4", "--eval", "none", "--log_json", str(log)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "under" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 14 of 14 linears"), warnings
    events = [json.loads(x) for x in log.read_text().splitlines()]
    under = [e for e in events if e["event"] == "under_target"]
    assert len(under) == 14 and all(e["bits"] < 3.29 and e["target"] == 3.3 for e in under)


@pytest.fixture(scope="module")
def fp16_llama(tiny_models, tmp_path_factory):
    """The tiny llama published in float16, as most checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tmp_path_factory.mktemp("fp16") / "llama16"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", ["fake", "packed"])
def test_cpu_run_saves_in_the_checkpoints_dtype(fp16_llama, text_files, tmp_path, fmt):
    """Computed in float32 on the CPU, saved in float16 like the input; the reported perplexity is
    that of the saved weights."""
    from transformers import AutoModelForCausalLM
    import packing
    from datautils import get_eval_tokens
    from layerwise import perplexity
    from model_io import ARCHS, load_tokenizer
    save = tmp_path / "out"
    proc = run_cli([str(fp16_llama), str(text_files["calib"]), *QUICK, *MI, "--sparsity", "0.5",
                    "--eval", str(text_files["eval"]), "--eval_windows", "4", "--save", str(save),
                    "--save_format", fmt])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((save / "compression_report.json").read_text())
    assert report["saved_dtype"] == "float16"
    if fmt == "fake":
        tensors = saved_tensors(save)
        assert {t.dtype for t in tensors.values()} == {torch.float16}
        model = AutoModelForCausalLM.from_pretrained(save, dtype=torch.float32)
    else:
        tensors = packing.read_packed(save)[1]
        assert tensors["model.embed_tokens.weight"].dtype == torch.float16
        model = packing.load_packed(save, dtype=torch.float32)
    tok = load_tokenizer(str(fp16_llama), False)
    tokens = get_eval_tokens(str(text_files["eval"]), tok, 64)
    ppl = perplexity(model.eval(), ARCHS["llama"], tokens, 64, torch.device("cpu"), torch.float32, 4)
    assert ppl == pytest.approx(report["ppl"][str(text_files["eval"])], rel=1e-6)


def test_no_compression_flags_only_evaluates(tiny_models, text_files, tmp_path):
    from datautils import get_eval_tokens
    from layerwise import perplexity
    from model_io import ARCHS, load_model, load_tokenizer
    log = tmp_path / "run.jsonl"
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), *QUICK, "--eval", str(text_files["eval"]),
                    "--eval_windows", "4", "--log_json", str(log)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "evaluating the model as it is" in proc.stdout
    kinds = [json.loads(x)["event"] for x in log.read_text().splitlines()]
    assert "layer" not in kinds and "linear" not in kinds, "no calibration or compression pass ran"
    tok = load_tokenizer(str(tiny_models["llama"]), False)
    model = load_model(str(tiny_models["llama"]), torch.float32, False)
    ppl = perplexity(model, ARCHS["llama"], get_eval_tokens(str(text_files["eval"]), tok, 64), 64,
                     torch.device("cpu"), torch.float32, 4)
    assert f"ppl {ppl:.3f}" in proc.stdout


def test_packed_save_stores_tied_weights_once_and_says_what_is_not_compressed(text_files, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from conftest import make_tokenizer
    import packing
    model_dir = tmp_path / "tied"
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).half().save_pretrained(model_dir)
    make_tokenizer(model_dir)
    save = tmp_path / "out"
    proc = run_cli([str(model_dir), str(text_files["calib"]), *QUICK, *MI, "--eval", "none", "--save", str(save),
                    "--save_format", "packed", "--no_checkpoint"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, stored = packing.read_packed(save)
    keys = set(stored)
    other = sum(t.numel() * 2 for k, t in stored.items() if not k.startswith(tuple(header["linears"])))
    assert "lm_head.weight" not in keys and header["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    disk = json.loads((save / "compression_report.json").read_text())["disk"]
    assert disk["other_bytes"] == other  # embeddings once, norms; all fp16
    assert disk["tied"] == ["lm_head.weight"]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("packed.safetensors"))
    assert f"{other / 2**20:.2f} MiB" in line and "not compressed linears" in line
    reloaded = packing.load_packed(save, dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
