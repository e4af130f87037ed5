"""DINOHead vs the official dinov2 head: same state-dict keys and shapes, same outputs, official init."""

import pytest
import torch
from dinov2.layers.dino_head import DINOHead as OfficialHead

from dinoforge.models.heads import DINOHead, cancel_last_layer_gradients

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*weight_norm.*:FutureWarning"
)  # raised inside the official reference code


def _pair(**kw):
    ours, ref = (
        DINOHead(16, 40, hidden_dim=32, bottleneck_dim=8, **kw),
        OfficialHead(16, 40, hidden_dim=32, bottleneck_dim=8, **kw),
    )
    return ours, ref


def test_state_dict_keys_and_shapes_match_official():
    for kw in ({}, {"nlayers": 1}, {"nlayers": 4, "use_bn": True}, {"mlp_bias": False}):
        ours, ref = _pair(**kw)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_outputs_match_official_with_loaded_weights():
    ours, ref = _pair()
    ref.last_layer.weight_g.data.uniform_(0.5, 2.0)  # a trained g, not the initial 1
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.last_layer.weight, ref.last_layer.weight)


def test_initialisation_follows_official():
    head = DINOHead(64, 100, hidden_dim=512, bottleneck_dim=64)
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.001  # trunc_normal_(std=0.02), cut at ±2 (absolute, so ~no cut)
    assert abs(w.mean().item()) < 0.001
    assert torch.all(head.mlp[0].bias == 0)
    torch.testing.assert_close(head.last_layer.weight_g, torch.ones(100, 1))
    # effective prototypes have unit norm at init, so logits are cosine similarities
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))
    out = head(torch.randn(3, 64))
    assert out.abs().max() <= 1 + 1e-5


def test_cancel_last_layer_gradients_freezes_only_prototypes():
    head = DINOHead(16, 40, hidden_dim=32, bottleneck_dim=8)
    before = {k: v.detach().clone() for k, v in head.state_dict().items()}
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.1)
    head(torch.randn(4, 16)).logsumexp(-1).mean().backward()
    cancel_last_layer_gradients(head)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    opt.step()
    after = head.state_dict()
    assert torch.equal(after["last_layer.weight_v"], before["last_layer.weight_v"])
    assert torch.equal(after["last_layer.weight_g"], before["last_layer.weight_g"])
    assert not torch.equal(after["mlp.0.weight"], before["mlp.0.weight"])
