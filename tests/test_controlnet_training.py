"""ControlNet's training recipe on the bundled tiny SD: the control copy starts as the UNet's
encoder with zero convolutions (so the first step computes exactly the frozen SD), only it
trains, and the release is an original-layout file that loads for the SD it was made for."""

from __future__ import annotations

import pytest
import torch

from model.sd.controlnet import load_controlnet
from model.training.controlnet_training import ControlNetTrainer, release_controlnet
from model.weights.checkpoint import CheckpointError
from tests.sd_layout import ROOT

BUNDLE = ROOT / "bundle"
DEPTH = {"name": "midas_tiny", "weights": str(BUNDLE / "tiny_world" / "midas_tiny.safetensors")}


@pytest.fixture(scope="module")
def trainer():
    base = str(BUNDLE / "tiny_sd" / "tiny_sd.safetensors")
    return ControlNetTrainer(base=base, depth=DEPTH, hint_widths=(16, 32, 64))


@torch.no_grad()
def test_the_copy_starts_as_the_unet_encoder_and_changes_nothing(trainer):
    sd, net = trainer.sd[0], trainer.control_model
    unet = sd.unet.state_dict()
    for key, value in net.state_dict().items():
        if key.startswith(("time_embed", "input_blocks", "middle_block.")):
            assert torch.equal(value, unet[key]), key
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    hint, t = torch.rand(2, 3, 64, 64, generator=gen), torch.tensor([5, 900])
    residuals = net(x, t, context, hint)
    assert all(r.abs().max() == 0 for r in residuals)  # zero convolutions
    assert torch.equal(sd.unet(x, t, context, control=residuals), sd.unet(x, t, context))
    trainable = {n for n, p in trainer.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("control_model.") for n in trainable)


def test_one_step_trains_the_copy_and_the_release_loads(trainer, tmp_path):
    frames = torch.rand(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"frames": frames, "caption": ["a red sphere", "a blue box"]}
    opt = torch.optim.SGD(trainer.control_model.parameters(), lr=1.0)
    loss = trainer.loss(batch, torch.Generator().manual_seed(2))
    loss.backward()
    opt.step()
    zero = trainer.control_model.zero_convs[0][0].weight
    assert zero.abs().max() > 0  # the zero convolutions got a gradient and moved
    path = tmp_path / "cn.ckpt"
    torch.save(
        {"state_dict": trainer.state_dict(), "hyper_parameters": dict(trainer.hparams)}, path
    )
    release_controlnet(path, tmp_path / "cn.safetensors", use_ema=False)
    loaded = load_controlnet(tmp_path / "cn.safetensors", trainer.sd[0].config.unet)
    assert torch.allclose(loaded.zero_convs[0][0].weight, zero.half().float())
    with pytest.raises(CheckpointError, match="not a ControlNetTrainer checkpoint"):
        torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": {}}, path)
        release_controlnet(path, tmp_path / "other.safetensors")
