"""Models in and out: the architecture table, loading (hub id, local folder, .gguf file) and
saving the compressed model with its report.

    spec = ARCHS[config.model_type]        # where layers, norm, embedding and head live
    model = load_model("path/or/hub-id", torch.float16, trust_remote_code=False)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from config import UsageError

SUPPORTED_HELP = "llama (LLaMA 1/2/3, Vicuna, Yi), mistral, qwen2, qwen3"
REPORT_FILE = "compression_report.json"


# ---------------------------------------------------------------- architectures
@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of a decoder-only family live, and its linears in true-sequential order
    (linears of one inner tuple share their input)."""
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    rotary: str | None = "model.rotary_emb"
    norm: str = "model.norm"
    head: str = "lm_head"
    groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),    # LLaMA 1/2/3, Vicuna, Yi; GQA through num_key_value_heads
    "mistral": ArchSpec(),  # sliding-window attention lives inside the layer
    "qwen2": ArchSpec(),    # q/k/v carry biases: kept, only weights are compressed
    "qwen3": ArchSpec(),    # q/k norms inside attention
}


def get_module(root, path: str):
    """root.a.b.c for path "a.b.c"."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ---------------------------------------------------------------- loading
def model_location(model: str) -> tuple[str, dict]:
    """(name or folder for from_pretrained, extra kwargs) for a hub id, folder or .gguf file."""
    p = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not p.is_file():
            raise UsageError(f"model file {model} does not exist")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"model path {model} is a file; pass a model folder, a .gguf file or a hub id")
        return str(p), {}
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep + os.sep in model:
        raise UsageError(f"model path {model} does not exist")
    return model, {}


def load_config(model: str, trust_remote_code: bool):
    """The model's configuration; refuses architectures outside ARCHS."""
    from transformers import AutoConfig
    where, extra = model_location(model)
    try:
        cfg = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except ImportError as e:
        raise UsageError(f"loading {model} needs a missing package: {e}")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"could not load the configuration of {model} ({first}); "
                         "if you are offline, pass a local model folder or .gguf file")
    if cfg.model_type not in ARCHS:
        raise UsageError(f"unsupported architecture {cfg.model_type!r} of {model}; supported: {SUPPORTED_HELP}")
    return cfg


def checkpoint_dtype(model_cfg) -> torch.dtype:
    """The dtype the model's weights are published in (float16 where the config does not say,
    as for GGUF files)."""
    d = getattr(model_cfg, "dtype", None) or getattr(model_cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float16


def load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer
    where, extra = model_location(model)
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (ImportError, ValueError, OSError) as e:
        text = str(e).lower()
        if "sentencepiece" in text or "tiktoken" in text or "protobuf" in text:
            # transformers 5 converts a SentencePiece tokenizer.model, which needs both packages
            raise UsageError(f"the tokenizer of {model} needs sentencepiece and protobuf: "
                             "pip install sentencepiece protobuf")
        raise UsageError(f"could not load the tokenizer of {model}: {str(e).splitlines()[0] if str(e) else e!r}")


def load_model(model: str, dtype, trust_remote_code: bool):
    """The whole model on the CPU in `dtype`, in eval mode, without a KV cache."""
    from transformers import AutoModelForCausalLM
    where, extra = model_location(model)
    # .bin checkpoints: from_pretrained's weights_only defaults to True (transformers 5.x), which reaches
    # torch.load(..., weights_only=True) in modeling_utils.load_state_dict; nothing here unpickles
    # arbitrary objects. trust_remote_code is only ever the --trust_remote_code flag.
    import pickle
    try:
        m = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 low_cpu_mem_usage=True, **extra)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        raise UsageError(f"the .bin weights of {model} hold more than tensors and were refused (torch.load "
                         f"weights_only=True{': ' + detail if detail else ''}); use a safetensors copy from a "
                         "source you trust")
    except ImportError as e:  # e.g. GGUF files need accelerate and gguf
        raise UsageError(f"loading {model} needs a missing package: {str(e).splitlines()[0]} "
                         "(pip install -r requirements.txt)")
    m.config.use_cache = False
    m.eval()
    return m


# ---------------------------------------------------------------- saving
def foreign_entries(folder: Path) -> list[str]:
    """Entries of an existing folder that no earlier save of this tool wrote there (a save
    lists what it wrote in its report)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own: set[str] = set()
    try:
        listed = json.loads((folder / REPORT_FILE).read_text()).get("files")
        if isinstance(listed, list):
            own = {str(f) for f in listed} | {REPORT_FILE}
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(p.name for p in folder.iterdir() if p.name not in own)


def check_save_target(save: str | Path, overwrite: bool) -> None:
    """Refuse a --save folder that holds anything this tool would have to delete without
    having written it: a non-empty folder needs --overwrite, and even then only an earlier
    save of this tool is replaced."""
    p = Path(save).expanduser()
    if not p.exists():
        return
    if not p.is_dir():
        raise UsageError(f"--save {save} is a file, not a folder")
    if not any(p.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"--save folder {save} exists and is not empty; pass --overwrite to replace an earlier "
                         "save of this tool, or choose another folder")
    foreign = foreign_entries(p)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UsageError(f"--save folder {save} holds files this tool did not write ({', '.join(foreign[:5])}{more});"
                         " --overwrite only replaces an earlier save of this tool: move them or choose another folder")


def save_model(model, tokenizer, out_dir: str, report: dict, overwrite: bool, packed: dict | None = None) -> None:
    """Write a model held whole in memory the way a run writes it (streaming.SaveWriter: one
    safetensors shard per decoder layer and one for the rest, with an index, in the model's
    dtype) to a temporary folder beside out_dir, then rename it into place: a save never leaves
    a half-written folder, and an existing folder is replaced only when it is an earlier save
    of this tool (--overwrite). packed: {"reports", "nm", "pruned"} for --save_format packed
    (None: dense); its disk report goes to report["disk"]. report["files"] lists what the
    save wrote."""
    from streaming import SaveWriter
    spec = ARCHS[model.config.model_type]
    layers = get_module(model, spec.layers)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    writer = SaveWriter(out_dir, len(layers), spec, dtype, None if packed is None else
                        {"nm": packed.get("nm", (0, 0)), "pruned": packed.get("pruned", False)}, overwrite)
    reports = (packed or {}).get("reports") or {}
    try:
        for i, layer in enumerate(layers):
            prefix = f"{spec.layers}.{i}."
            writer.write_layer(i, layer.state_dict(), {n[len(prefix):]: r for n, r in reports.items()
                                                       if n.startswith(prefix)})
        writer.finish(model, tokenizer, report)
    finally:
        writer.abort()


def write_report(folder: str | Path, report: dict) -> None:
    """Replace the report of a saved folder (atomically), e.g. once evaluation has added ppl."""
    path = Path(folder) / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def plain_config(model, dtype: torch.dtype):
    """The configuration a save writes, as save_pretrained writes it (dtype and architectures
    set), without the quantization config a GGUF-loaded model carries (plain transformers
    refuses to load a folder that has one but no quantized weights)."""
    import copy
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = str(dtype).split(".")[1]
    cfg.architectures = [model.__class__.__name__]
    return cfg
