"""The hub loaders (wikitext2, ptb, c4) offline: `datasets.load_dataset` is replaced by local
rows of the real schemas, so everything after the download runs as it does online: the hub
ids asked for, the splits, how the text is joined, the calibration windows and the evaluation
cut."""
from __future__ import annotations

import random

import pytest
import torch

import datautils
from conftest import make_text

WIKI_ROWS = {"train": [" = Valkyria Chronicles = \n", "", make_text(1200, 3) + "\n"],
             "test": [" = Robert Boulter = \n", "", make_text(800, 4) + "\n"]}
PTB_ROWS = {"train": make_text(1200, 5).split("\n"), "test": make_text(800, 6).split("\n")}
C4_ROWS = {"train": [make_text(300 + 60 * i, 10 + i) for i in range(12)],
           "validation": [make_text(240, 30 + i) for i in range(5)]}


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from the rows above; records every call."""
    import datasets
    calls = []

    def load_dataset(path, name=None, split=None, data_files=None, revision=None, **kw):
        calls.append({"path": path, "name": name, "split": split, "data_files": data_files, "revision": revision})
        if path == "Salesforce/wikitext" and name == "wikitext-2-raw-v1":
            return datasets.Dataset.from_dict({"text": WIKI_ROWS[split]})
        if path == "ptb-text-only/ptb_text_only" and revision == "refs/convert/parquet":
            return datasets.Dataset.from_dict({"sentence": PTB_ROWS[split]})
        if path == "allenai/c4" and data_files and set(data_files) == {split}:
            docs = C4_ROWS[split]
            return datasets.Dataset.from_dict({"text": docs, "timestamp": ["2019-04-25T12:57:54Z"] * len(docs),
                                               "url": [f"https://example.org/{i}" for i in range(len(docs))]})
        raise FileNotFoundError(f"no such dataset {path}/{name}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    datautils.hub_rows.cache_clear()
    yield calls
    datautils.hub_rows.cache_clear()


@pytest.fixture(scope="module")
def tok(tiny_models):
    from model_io import load_tokenizer
    return load_tokenizer(str(tiny_models["llama"]), False)


def ids(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt").input_ids


def test_hub_ids_and_splits(fake_hub, tok):
    datautils.ensure_available("wikitext2", "evaluation")
    datautils.ensure_available("ptb", "calibration")
    datautils.ensure_available("c4", "evaluation")
    datautils.ensure_available("c4", "evaluation")  # downloaded once per process
    assert fake_hub == [
        {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test", "data_files": None,
         "revision": None},
        {"path": "ptb-text-only/ptb_text_only", "name": "penn_treebank", "split": "train", "data_files": None,
         "revision": "refs/convert/parquet"},
        {"path": "allenai/c4", "name": None, "split": "validation",
         "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "revision": None}]


def test_evaluation_text_as_the_papers_cut_it(fake_hub, tok):
    assert torch.equal(datautils.get_eval_tokens("wikitext2", tok, 64), ids(tok, "\n\n".join(WIKI_ROWS["test"])))
    assert torch.equal(datautils.get_eval_tokens("ptb", tok, 64), ids(tok, " ".join(PTB_ROWS["test"])))
    c4 = datautils.get_eval_tokens("c4", tok, 8)
    assert torch.equal(c4, ids(tok, " ".join(C4_ROWS["validation"][:1100]))[:, :256 * 8])
    assert c4.shape[1] == 256 * 8


@pytest.mark.parametrize("name,rows,joiner", [("wikitext2", WIKI_ROWS, "\n\n"), ("ptb", PTB_ROWS, " ")])
def test_calibration_windows_from_the_train_split(fake_hub, tok, name, rows, joiner):
    seqlen = 64
    windows = datautils.get_loaders(name, tok, 6, 3, seqlen)
    stream = ids(tok, joiner.join(rows["train"]))
    random.seed(3)
    starts = [random.randint(0, stream.shape[1] - seqlen - 1) for _ in range(6)]
    assert len(windows) == 6
    for w, s in zip(windows, starts):
        assert w.shape == (1, seqlen) and torch.equal(w, stream[:, s:s + seqlen])


def test_c4_calibration_one_long_document_per_window(fake_hub, tok):
    seqlen = 128
    docs = [ids(tok, d) for d in C4_ROWS["train"]]
    windows = datautils.get_loaders("c4", tok, 5, 0, seqlen)
    assert len(windows) == 5
    for w in windows:
        assert w.shape == (1, seqlen)
        hosts = [d for d in docs if d.shape[1] > seqlen and
                 any(torch.equal(d[:, s:s + seqlen], w) for s in range(d.shape[1] - seqlen))]
        assert hosts, "every window is a slice of one training document longer than seqlen"
    assert all(torch.equal(a, b) for a, b in zip(windows, datautils.get_loaders("c4", tok, 5, 0, seqlen)))


def test_hub_failure_is_a_clear_data_error(fake_hub, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(datautils.DataError, match="offline, pass a local .txt/.jsonl file"):
        datautils.ensure_available("wikitext2", "evaluation")
