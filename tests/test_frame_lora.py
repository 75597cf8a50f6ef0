"""Keyframed LoRA weights (``model.sd.frame_lora``): each row of a UNet call runs with its
own LoRA weight, equal to the LoRA merged at that weight, on an SD UNet and a Gen-1 video
UNet; hooks off again afterwards; bad weights refused."""

from __future__ import annotations

import pytest
import torch

from model.nets.unet import UNet
from model.sd.frame_lora import FrameLoras, frame_lora_rows
from model.sd.loading import load_sd
from model.sd.lora import merge_loras, read_lora
from tests.lora_files import write_kohya_lora
from tests.sd_files import tiny_config, write_tiny_sd
from tests.sd_layout import config


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frame_lora")
    path, _ = write_tiny_sd(tmp, "base.safetensors", tiny_config("sd1"), seed=3)
    model = load_sd(path)
    loras = [read_lora(write_kohya_lora(tmp / f"l{i}.safetensors", model, seed=i)) for i in (1, 2)]
    return model, loras


def merged_output(unet, loras, weights, x, t, ctx, **kwargs):
    with merge_loras(list(zip(loras, weights, strict=True)), unet, skip_text=True):
        return unet(x, t, ctx, **kwargs)


@torch.no_grad()
def test_each_row_equals_the_lora_merged_at_its_weight(sd):
    model, loras = sd
    unet = model.unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 400, 900])
    ctx = torch.randn(3, 77, model.text_encoder.config.width, generator=gen)
    weights = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.3, -0.7]])
    plain = unet(x, t, ctx)
    frame_loras = FrameLoras(loras, unet)
    assert frame_loras.layers > 10 and frame_loras.count == 2
    try:
        with frame_loras.rows(weights):
            out = unet(x, t, ctx)
    finally:
        frame_loras.remove()
    for row, w in enumerate(weights.tolist()):
        expected = merged_output(
            unet, loras, w, x[row : row + 1], t[row : row + 1], ctx[row : row + 1]
        )
        torch.testing.assert_close(out[row : row + 1], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[1], plain[1], atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(unet(x, t, ctx), plain)  # hooks gone, q/k/v fused again
    assert all(m.fuse_qkv for m in unet.modules() if hasattr(m, "fuse_qkv"))


@torch.no_grad()
def test_video_frames_take_their_own_weight_through_model_fn(sd):
    """A Gen-1-style video UNet (temporal layers off, so frames do not mix) with an SD 1.5
    LoRA: frame f of ``lora_scale`` ``(B, F, L, 1, 1)`` equals the LoRA merged at its
    weight."""
    model, loras = sd
    width = model.text_encoder.config.width
    torch.manual_seed(0)
    unet = UNet(**{**config("unet", "tiny"), "context_dim": width}).eval()
    unet.load_state_dict(model.unet.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 8, 8, generator=gen)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, width, generator=gen)
    scale = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 2, 1, 1).clone()
    scale[:, :, 1] = 0.0  # the second file off everywhere
    frame_loras = FrameLoras(loras, unet)
    try:
        with frame_lora_rows(frame_loras, scale):
            out = unet(x, t, ctx, temporal=False)
        with pytest.raises(RuntimeError, match="outside"):
            unet(x, t, ctx, temporal=False)  # an unset weight is an error, not 0
        with pytest.raises(ValueError, match="rows"):
            with frame_lora_rows(frame_loras, scale[:, :2]):
                unet(x, t, ctx, temporal=False)
    finally:
        frame_loras.remove()
    for f, w in enumerate([0.0, 0.5, 1.0]):
        expected = merged_output(unet, loras, [w, 0.0], x[:, f : f + 1], t, ctx, temporal=False)
        torch.testing.assert_close(out[:, f : f + 1], expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no keyframed LoRA"):
        frame_lora_rows(None, scale)
