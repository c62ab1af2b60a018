"""Fixtures: tiny random LLaMA / Mistral / Qwen2 models with a tokenizer trained in the test,
and small text files. Nothing here needs the network or files outside the repository."""
from __future__ import annotations

import random
from pathlib import Path

import pytest


WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if can more no "
         "model weight layer bit channel group prune quantize error hessian cluster information").split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        # a little structure (bigram preferences) so a model has something to learn
        w = [rng.choice(WORDS)]
        for _ in range(11):
            w.append(WORDS[(WORDS.index(w[-1]) * 7 + rng.randint(0, 3)) % len(WORDS)])
        lines.append(" ".join(w) + ".")
    return "\n".join(lines)


def write_texts(folder: Path) -> dict[str, Path]:
    """calib.txt and eval.txt (different seeds) in folder: the tests' calibration and evaluation text."""
    calib, ev = folder / "calib.txt", folder / "eval.txt"
    calib.write_text(make_text(6000, 1))
    ev.write_text(make_text(3000, 2))
    return {"calib": calib, "eval": ev}


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    return write_texts(tmp_path_factory.mktemp("data"))


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(3000, 0)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, model_type: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if model_type == "qwen2":
        common["use_sliding_window"] = False
    cfg = AutoConfig.for_model(model_type, **common)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {t: make_model(root / t, t) for t in ("llama", "mistral", "qwen2")}
