"""Prepacked oneDNN weights: the same outputs as plain weights, the plain weights restored bit
for bit, inference only, and layers whose weights are read directly left alone."""

import pytest
import torch
from torch import nn

from model.nets.attention import Attention
from model.nets.unet import UNet
from model.weights import prepack
from model.weights.prepack import prepacked_weights
from tests.sd_layout import config

pytestmark = pytest.mark.skipif(not prepack.available(), reason="PyTorch built without oneDNN")


def random_unet(name: str) -> UNet:
    torch.manual_seed(0)
    unet = UNet(**config("unet", name)).eval()
    with torch.no_grad():
        for p in unet.parameters():  # zero-initialised output layers too
            p.normal_(0, 0.05)
    return unet


def unet_inputs(name: str):
    params = config("unet", name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, params["in_channels"], 16, 24, generator=gen)
    context = torch.randn(2, 7, params["context_dim"], generator=gen)
    return x, torch.tensor([10, 900]), context


@pytest.mark.parametrize("name", ["tiny", "tiny_sd2"])  # conv / linear transformer projections
def test_prepacked_unet_matches_plain_weights_and_restores_them(name):
    unet = random_unet(name)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    inputs = unet_inputs(name)
    with torch.no_grad():
        plain = unet(*inputs)
        with prepacked_weights(unet) as count:
            packed = unet(*inputs)
            emptied = [m for m in unet.modules() if isinstance(m, nn.Linear)][0].weight
            assert emptied.numel() == 0  # the plain copy is not held twice
            assert not any(m.fuse_qkv for m in unet.modules() if isinstance(m, Attention))
    assert count > 10
    assert plain.abs().mean() > 0.05
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.fuse_qkv for m in unet.modules() if isinstance(m, Attention))
    assert all("forward" not in m.__dict__ for m in unet.modules())


def test_weights_come_back_when_the_block_raises():
    unet = random_unet("tiny")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match="inside"), prepacked_weights(unet):
        raise ValueError("inside")
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_nested_contexts_pack_once_and_restore_once():
    unet = random_unet("tiny")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    inputs = unet_inputs("tiny")
    with torch.no_grad(), prepacked_weights(unet) as outer:
        with prepacked_weights(unet) as inner:
            assert inner == 0 and outer > 0
            unet(*inputs)
        unet(*inputs)  # still packed after the inner block
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_prepacked_weights_refuse_training():
    layer = nn.Linear(8, 4)
    with prepacked_weights(layer):
        with pytest.raises(RuntimeError, match="inference"):
            layer(torch.randn(2, 8))  # grad enabled, the bias requires grad
        with torch.no_grad():
            assert layer(torch.randn(2, 8)).shape == (2, 4)


class ReadsItsWeight(nn.Conv2d):
    """Like timm's Conv2dSame: its forward reads ``self.weight`` itself."""

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, self.bias, padding=1)


def test_layers_that_read_their_weights_are_left_plain():
    torch.manual_seed(0)
    net = nn.ModuleDict(
        {"conv": ReadsItsWeight(3, 4, 3), "mha": nn.MultiheadAttention(8, 2, batch_first=True)}
    )
    x, tokens = torch.randn(1, 3, 6, 6), torch.randn(1, 5, 8)
    with torch.no_grad():
        plain = net["conv"](x), net["mha"](tokens, tokens, tokens)[0]
        with prepacked_weights(net) as count:
            packed = net["conv"](x), net["mha"](tokens, tokens, tokens)[0]
    assert count == 0
    for a, b in zip(plain, packed, strict=True):
        assert torch.equal(a, b)
