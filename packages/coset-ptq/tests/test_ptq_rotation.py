import pytest
import torch

from coset.ptq.rotation import (
    derive_seed,
    layer_rotations,
    rotate_hessian,
    rotate_input,
    rotate_weight,
    unrotate_output,
    unrotate_weight,
)


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, dtype=torch.float64, generator=g) * torch.rand(n, dtype=torch.float64, generator=g)
    return X.t() @ X / (4 * n)


def test_seed_is_stable_and_distinct():
    assert derive_seed(0, "model.layers.0.mlp.up_proj", "in") == derive_seed(0, "model.layers.0.mlp.up_proj", "in")
    seeds = {derive_seed(s, nm, side) for s in (0, 1) for nm in ("a", "b", "c") for side in ("in", "out")}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError):
        derive_seed(0, "a", "left")


def test_layers_get_different_signs():
    ro1, ri1 = layer_rotations(384, 384, 0, "layer.0.q")
    ro2, ri2 = layer_rotations(384, 384, 0, "layer.1.q")
    assert not torch.equal(ri1.signs(), ri2.signs())
    assert not torch.equal(ro1.signs(), ro2.signs())
    assert not torch.equal(ri1.signs(), ro1.signs())


@pytest.mark.parametrize("m,n", [(1536, 576), (384, 1536), (192, 384)])
def test_weight_inverse_and_proxy_invariance(m, n):
    g = torch.Generator().manual_seed(m + n)
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    dW = 0.01 * torch.randn(m, n, dtype=torch.float64, generator=g)
    H = _spd(n, n)
    ro, ri = layer_rotations(m, n, 7, "x")
    Wt = rotate_weight(W, ro, ri)
    assert torch.allclose(unrotate_weight(Wt, ro, ri), W, atol=1e-10)
    assert torch.allclose(Wt, ro.matrix() @ W @ ri.matrix().t(), atol=1e-10)
    Ht = rotate_hessian(H, ri)
    assert torch.allclose(Ht, ri.matrix() @ H @ ri.matrix().t(), atol=1e-10)
    dWt = rotate_weight(W + dW, ro, ri) - Wt
    loss = torch.trace(dW @ H @ dW.t())
    loss_t = torch.trace(dWt @ Ht @ dWt.t())
    assert torch.allclose(loss, loss_t, rtol=1e-10)


def test_forward_identity():
    m, n = 192, 384
    W = torch.randn(m, n, dtype=torch.float64)
    x = torch.randn(5, n, dtype=torch.float64)
    ro, ri = layer_rotations(m, n, 3, "lin")
    Wt = rotate_weight(W, ro, ri)
    y = unrotate_output(rotate_input(x, ri) @ Wt.t(), ro)
    assert torch.allclose(y, x @ W.t(), atol=1e-10)


def test_shape_errors():
    ro, ri = layer_rotations(8, 16, 0, "a")
    with pytest.raises(ValueError):
        rotate_weight(torch.zeros(16, 8), ro, ri)
    with pytest.raises(ValueError):
        rotate_hessian(torch.zeros(8, 8), ri)
