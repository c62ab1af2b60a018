"""Bad input to the CLI: exit code 2, one `error: ...` line naming the problem, no traceback,
nothing written to --save."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import one_error_line, run_cli

def assert_usage_error(proc: subprocess.CompletedProcess, keywords: list[str]) -> str:
    msg = one_error_line(proc, 2)
    for kw in keywords:
        assert kw.lower() in msg.lower(), f"{kw!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def foreign_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 and OPT checkpoints: real architectures the tool does not support."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig
    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    cfgs = {"gpt2": GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64,
                               bos_token_id=1, eos_token_id=2),
            "opt": OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                             vocab_size=300, max_position_embeddings=64, word_embed_proj_dim=32,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)}
    out = {}
    for name, cfg in cfgs.items():
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


def bad_cases():
    """(id, argv builder, keywords). A builder gets the tiny models, the foreign models and the
    text files, and returns the argv; --eval/--nsamples/--seqlen get small defaults."""
    L = lambda m, f, t: [str(m["llama"]), str(t["calib"])]  # noqa: E731
    return [
        ("model_missing", lambda m, f, t: [str(m["llama"].parent / "no_such_model"), str(t["calib"])],
         ["does not exist"]),
        ("model_missing_gguf", lambda m, f, t: [str(m["llama"].parent / "nope.gguf"), str(t["calib"])],
         ["does not exist"]),
        ("gpt2", lambda m, f, t: [str(f["gpt2"]), str(t["calib"])], ["unsupported architecture", "gpt2", "llama"]),
        ("opt", lambda m, f, t: [str(f["opt"]), str(t["calib"])], ["unsupported architecture", "opt", "llama"]),
        ("unknown_dataset", lambda m, f, t: [str(m["llama"]), "wikitext3"], ["unknown dataset", "wikitext3"]),
        ("unknown_eval_dataset", lambda m, f, t: L(m, f, t) + ["--eval", "nonsense_set"], ["unknown dataset"]),
        ("sparsity_1", lambda m, f, t: L(m, f, t) + ["--sparsity", "1.0"], ["--sparsity"]),
        ("sparsity_negative", lambda m, f, t: L(m, f, t) + ["--sparsity", "-0.1"], ["--sparsity"]),
        ("nm_2_0", lambda m, f, t: L(m, f, t) + ["--prunen", "2", "--prunem", "0"], ["--prunen", "2:0"]),
        ("nm_4_4", lambda m, f, t: L(m, f, t) + ["--prunen", "4", "--prunem", "4"], ["--prunen", "4:4"]),
        ("nm_and_sparsity", lambda m, f, t: L(m, f, t) + ["--prunen", "2", "--prunem", "4", "--sparsity", "0.5"],
         ["not both"]),
        ("wbits_1", lambda m, f, t: L(m, f, t) + ["--wbits", "1"], ["--wbits"]),
        ("wbits_9", lambda m, f, t: L(m, f, t) + ["--wbits", "9"], ["--wbits"]),
        ("target_above_max", lambda m, f, t: L(m, f, t) + ["--target_avg_bits", "9"], ["--target_avg_bits"]),
        ("target_below_min", lambda m, f, t: L(m, f, t) + ["--target_avg_bits", "2.5", "--min_bits", "3"],
         ["--target_avg_bits"]),
        ("n_groups_0", lambda m, f, t: L(m, f, t) + ["--n_groups", "0"], ["--n_groups"]),
        ("auto_groupsize_negative", lambda m, f, t: L(m, f, t) + ["--auto_groupsize", "-1"], ["--auto_groupsize"]),
        ("nsamples_0", lambda m, f, t: L(m, f, t) + ["--nsamples", "0"], ["--nsamples"]),
        ("seqlen_too_long", lambda m, f, t: L(m, f, t) + ["--seqlen", "512"], ["max_position_embeddings", "256"]),
        ("blocksize_256", lambda m, f, t: L(m, f, t) + ["--blocksize", "256"], ["--blocksize", "128"]),
        ("max_gpu_memory_0", lambda m, f, t: L(m, f, t) + ["--max_gpu_memory", "0"], ["--max_gpu_memory", "positive"]),
    ]


CASES = bad_cases()


@pytest.mark.parametrize("build,keywords", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2(build, keywords, tiny_models, foreign_models, text_files, tmp_path):
    save = tmp_path / "out"
    argv = build(tiny_models, foreign_models, text_files)
    defaults = {"--eval": str(text_files["eval"]), "--nsamples": "2", "--seqlen": "32"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    proc = run_cli(argv + ["--device", "cpu", "--save", str(save)])
    assert_usage_error(proc, keywords)
    assert not save.exists(), "a failed run must not create --save"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no temporary folder left behind"


def test_save_into_non_empty_folder_needs_overwrite(tiny_models, text_files, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("user data")
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), "--device", "cpu", "--nsamples", "2",
                    "--seqlen", "32", "--eval", "none", "--save", str(save)])
    assert_usage_error(proc, ["not empty", "--overwrite"])
    assert [p.name for p in save.iterdir()] == ["keep.txt"]
    assert (save / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hub_dataset_offline_message(tiny_models, text_files, tmp_path):
    """Offline, a hub dataset name fails with advice to pass a local file, not a hub stack trace
    (with a quantization flag: a run without one needs no calibration data)."""
    proc = run_cli([str(tiny_models["llama"]), "wikitext2", "--device", "cpu", "--nsamples", "2", "--seqlen", "32",
                    "--wbits", "4", "--eval", str(text_files["eval"]), "--save", str(tmp_path / "out")],
                   env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    msg = assert_usage_error(proc, ["wikitext", "local", ".txt"])
    assert len(msg) < 400
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_gpu(tiny_models, text_files, tmp_path):
    proc = run_cli([str(tiny_models["llama"]), str(text_files["calib"]), "--device", "cuda", "--nsamples", "2",
                    "--seqlen", "32", "--eval", "none", "--save", str(tmp_path / "out")])
    assert_usage_error(proc, ["cuda"])
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag():
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for flag in ("--sparsity", "--prunen", "--wbits", "--target_avg_bits", "--use_mi_grouping", "--n_groups",
                 "--nsamples", "--seqlen", "--save", "--overwrite", "--eval", "--device", "--max_gpu_memory",
                 "--no_stream", "--true_sequential"):
        assert flag in proc.stdout


@pytest.mark.parametrize("argv, grouping", [
    (["--wbits", "4", "--target_avg_bits", "3.5"], "mi_hessian"),
    (["--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0"], "mi"),
    (["--prunen", "2", "--prunem", "4", "--wbits", "4", "--target_avg_bits", "3.0"], "mi"),
    (["--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0", "--grouping", "mi_hessian"], "mi_hessian"),
    (["--wbits", "4", "--target_avg_bits", "3.5", "--grouping", "hessian_sim"], "hessian_sim"),
])
def test_default_grouping_follows_pruning(argv, grouping):
    """--grouping left out: MI alone when pruning (it measured better there), MI x Hessian
    otherwise; an explicit choice always wins."""
    import vicuna_mi
    args = vicuna_mi.build_parser().parse_args(["MODEL", "DATA", *argv])
    assert vicuna_mi.config_from_args(args).grouping == grouping


def test_flag_defaults_are_the_configs():
    """The CLI writes its defaults out beside CompressConfig's: every flag that names a config
    field has that field's default, except --n_groups and --grouping, which the CLI resolves
    from other flags (test_default_grouping_follows_pruning)."""
    import dataclasses

    import vicuna_mi
    from config import CompressConfig
    flags = {a.dest: a.default for a in vicuna_mi.build_parser()._actions}
    shared = [f for f in dataclasses.fields(CompressConfig) if f.name in flags]
    assert len(shared) > 20
    differ = {f.name for f in shared if flags[f.name] != f.default}
    assert differ == {"n_groups", "grouping"}, differ


def test_true_sequential_flag_reaches_the_config():
    import vicuna_mi
    parse = vicuna_mi.build_parser().parse_args
    assert vicuna_mi.config_from_args(parse(["M", "D", "--wbits", "4"])).true_sequential is True
    assert vicuna_mi.config_from_args(parse(["M", "D", "--wbits", "4", "--true_sequential", "0"])).true_sequential is False
