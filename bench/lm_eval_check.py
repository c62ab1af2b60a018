"""Saved models in lm-evaluation-harness: its `hf` model type (HFLM, what `lm_eval --model hf
--model_args pretrained=DIR` builds) loads a `fake` save, and a `packed` save rewritten as a
plain folder with packing.load_packed(...).save_pretrained(...), and its log-likelihoods equal
those computed directly with transformers.

    pip install lm-eval
    python -m bench.lm_eval_check FAKE_DIR PACKED_DIR [--device cpu]

Runs offline (no task data is needed: the requests are built here). Prints one line per
folder: lm-eval's log-likelihoods, then the direct ones; exits 1 if they differ.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import packing

REQUESTS = [("the model of the layer", " is a weight"), ("hessian cluster", " information and the bit")]


def direct(folder: str, device: str) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    out = []
    for ctx, cont in REQUESTS:
        c, w = tok(ctx).input_ids, tok(ctx + cont).input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([w], device=device)).logits[0].float(), -1)
        out.append(sum(float(lp[p - 1, w[p]]) for p in range(len(c), len(w))))
    return out


def via_lm_eval(folder: str, device: str) -> list[float]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=folder, device=device, batch_size=1, dtype="float32")
    return [r[0] for r in lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i)
                                            for i, a in enumerate(REQUESTS)])]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fake")
    p.add_argument("packed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from transformers import AutoTokenizer
    plain = Path(tempfile.mkdtemp(prefix="from-packed-"))
    packing.load_packed(args.packed, dtype=None).save_pretrained(plain)
    AutoTokenizer.from_pretrained(args.packed).save_pretrained(plain)
    ok = True
    for folder in (args.fake, str(plain)):
        a, b = via_lm_eval(folder, args.device), direct(folder, args.device)
        same = all(abs(x - y) <= 1e-4 * max(1.0, abs(y)) for x, y in zip(a, b))
        ok &= same
        print(f"{folder}: lm-eval {[round(x, 5) for x in a]}  transformers {[round(y, 5) for y in b]}  "
              f"{'equal' if same else 'DIFFERENT'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
