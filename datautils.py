"""Calibration and evaluation data.

Hub datasets are loaded through `datasets` exactly as the GPTQ / SparseGPT papers do:
- calibration: random `seqlen`-token windows (Python `random` seeded with --seed) from the
  wikitext2 train split joined by "\\n\\n", the ptb train split joined by " ", or C4's first
  train shard (one random document of more than `seqlen` tokens per window);
- evaluation: wikitext2 test joined by "\\n\\n", ptb test joined by " ", C4 validation: the
  first 1100 documents joined by " ", cut to 256 windows.
Local data: a `.txt` file, a `.jsonl` file (field "text"), or a folder of them (sorted,
joined by a blank line), tokenized as one string; calibration windows start at offsets drawn
from `torch.Generator().manual_seed(seed)`, evaluation uses consecutive windows.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch

HUB_DATASETS = ("wikitext2", "ptb", "c4")
LOCAL_SUFFIXES = (".txt", ".jsonl")


class DataError(Exception):
    """A dataset that cannot be found or loaded; the message says what to do."""


def is_local(name: str) -> bool:
    return Path(name).exists()


def check_dataset(name: str) -> None:
    """Fail early (before the model is loaded) on a name that is neither known nor a path."""
    if name in HUB_DATASETS:
        return
    p = Path(name)
    if p.is_file():
        if p.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"dataset file {name} must end in .txt or .jsonl")
        return
    if p.is_dir():
        if not _local_files(p):
            raise DataError(f"dataset folder {name} holds no .txt or .jsonl file")
        return
    raise DataError(f"unknown dataset {name!r}: use one of {', '.join(HUB_DATASETS)} "
                    "or the path of a local .txt/.jsonl file or folder")


def _local_files(p: Path) -> list[Path]:
    return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)


def read_local_text(name: str) -> str:
    """The text of a local .txt/.jsonl file, or of every such file in a folder."""
    p = Path(name)
    files = _local_files(p) if p.is_dir() else [p]
    parts = []
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            parts.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise DataError(f"{f}:{n}: expected a JSON object with a \"text\" field ({e})")
        else:
            parts.append(f.read_text(encoding="utf-8"))
    text = "\n\n".join(parts)
    if not text.strip():
        raise DataError(f"dataset {name} is empty")
    return text


def _load_hub(*args, **kwargs):
    """datasets.load_dataset with errors that say how to work offline."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("the hub datasets need the `datasets` package: pip install datasets "
                        "(or pass a local .txt/.jsonl file or folder)")
    try:
        return load_dataset(*args, **kwargs)
    except Exception as e:  # network, hub or cache errors take many forms
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load {args[0]} from the Hugging Face hub ({first}); "
                        "if you are offline, pass a local .txt/.jsonl file or folder instead, "
                        "e.g. `python vicuna_mi.py MODEL calib.txt --eval eval.txt`")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids  # (1, N)


# The hub sources. ptb_text_only was a script dataset, which `datasets` 4 no longer runs: the
# hub's own parquet conversion of it (branch refs/convert/parquet) holds the same rows.
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
_HUB_LOADERS = {
    "wikitext2": lambda split: _load_hub("Salesforce/wikitext", "wikitext-2-raw-v1", split=split),
    "ptb": lambda split: _load_hub("ptb-text-only/ptb_text_only", "penn_treebank", revision="refs/convert/parquet",
                                   split=split),
    "c4": lambda split: _load_hub("allenai/c4", data_files={split: _C4_FILES[split]}, split=split),
}
_SPLITS = {"calibration": {"wikitext2": "train", "ptb": "train", "c4": "train"},
           "evaluation": {"wikitext2": "test", "ptb": "test", "c4": "validation"}}


@functools.cache
def hub_rows(name: str, split: str):
    """The rows of a hub dataset's split (a datasets.Dataset), downloaded once per process."""
    return _HUB_LOADERS[name](split)


def ensure_available(name: str, role: str) -> None:
    """Fail now, with a DataError that says what to do, when a dataset needed later for
    `role` ("calibration" or "evaluation") cannot be had (unknown name, missing file,
    hub unreachable); a hub split is loaded here once and reused."""
    check_dataset(name)
    if not is_local(name):
        hub_rows(name, _SPLITS[role][name])


def _hub_text(name: str, split: str) -> str:
    if name == "wikitext2":
        return "\n\n".join(hub_rows(name, split)["text"])
    if name == "ptb":
        return " ".join(hub_rows(name, split)["sentence"])
    raise KeyError(name)


def _windows_python_random(tokens: torch.Tensor, nsamples: int, seed: int, seqlen: int) -> list[torch.Tensor]:
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, tokens.shape[1] - seqlen - 1)
        out.append(tokens[:, i:i + seqlen])
    return out


def get_loaders(name: str, tokenizer, nsamples: int, seed: int, seqlen: int) -> list[torch.Tensor]:
    """`nsamples` calibration windows, each a (1, seqlen) LongTensor."""
    check_dataset(name)
    if is_local(name):
        tokens = _tokenize(tokenizer, read_local_text(name))
        L = tokens.shape[1]
        if L <= seqlen + 1:
            raise DataError(f"dataset {name} has {L} tokens, fewer than one window of {seqlen}")
        gen = torch.Generator().manual_seed(seed)
        return [tokens[:, i:i + seqlen] for i in
                (int(torch.randint(0, L - seqlen - 1, (1,), generator=gen)) for _ in range(nsamples))]
    if name == "c4":
        data = hub_rows("c4", "train")
        random.seed(seed)
        out = []
        for _ in range(nsamples):
            while True:
                doc = _tokenize(tokenizer, data[random.randint(0, len(data) - 1)]["text"])
                if doc.shape[1] > seqlen:
                    break
            i = random.randint(0, doc.shape[1] - seqlen - 1)
            out.append(doc[:, i:i + seqlen])
        return out
    return _windows_python_random(_tokenize(tokenizer, _hub_text(name, "train")), nsamples, seed, seqlen)


def get_eval_tokens(name: str, tokenizer, seqlen: int) -> torch.Tensor:
    """The evaluation token stream (1, N) of a dataset, cut as its protocol says."""
    check_dataset(name)
    if is_local(name):
        return _tokenize(tokenizer, read_local_text(name))
    if name == "c4":
        data = hub_rows("c4", "validation")
        return _tokenize(tokenizer, " ".join(data[:1100]["text"]))[:, : 256 * seqlen]
    return _tokenize(tokenizer, _hub_text(name, "test"))
