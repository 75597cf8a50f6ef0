"""The video UNet: image model at init, real temporal mixing, per-clip gating, checkpointing."""

import pytest
import torch
from safetensors.torch import save_file

from model.nets.unet import UNet
from model.weights.checkpoint import UNET_PREFIX, load_sd_unet
from tests.sd_layout import config, randomise


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """A random SD-layout file of the tiny UNet with 4 latent + 1 structure input channels."""
    params = {**config("unet", "tiny"), "in_channels": 5}
    state = randomise(UNet(**params).state_dict(), 0)
    path = tmp_path_factory.mktemp("sd") / "tiny.safetensors"
    save_file({UNET_PREFIX + k: v for k, v in state.items()}, str(path))
    return path, params


def loaded(sd_file, **kwargs) -> UNet:
    path, params = sd_file
    unet = UNet(**{**params, **kwargs}).eval()
    load_sd_unet(unet, path)
    return unet


def perturb_temporal(unet: UNet, seed: int = 0) -> None:
    """Give every temporal parameter random values (they start at zero or near it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.temporal_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def video_inputs(frames: int, batch: int = 2, side: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 5, side, side, generator=gen)
    t = torch.tensor([20, 700])[:batch]
    context = torch.randn(batch, 1, 32, generator=gen)
    return x, t, context


@pytest.mark.parametrize("frames", [1, 2, 7, 16])
@torch.no_grad()
def test_fresh_video_unet_is_the_image_unet_frame_by_frame(sd_file, frames):
    image = loaded(sd_file)
    video = loaded(sd_file, temporal=True)
    x, t, context = video_inputs(frames)
    out = video(x, t, context)
    assert out.shape == (2, frames, 4, 8, 8)
    for f in range(frames):
        expected = image(x[:, f], t, context)
        assert (out[:, f] - expected).abs().max() < 1e-5


@torch.no_grad()
def test_temporal_layers_mix_frames_only_when_on(sd_file):
    video = loaded(sd_file, temporal=True)
    perturb_temporal(video)
    x, t, context = video_inputs(4)
    changed = x.clone()
    changed[:, 0] += 1.0
    on = (video(changed, t, context) - video(x, t, context))[:, 1:].abs().max()
    off = video(changed, t, context, temporal=False) - video(x, t, context, temporal=False)
    assert on > 1e-3
    assert off[:, 1:].abs().max() == 0
    assert off[:, 0].abs().max() > 1e-3


@torch.no_grad()
def test_temporal_false_is_the_image_model_even_when_trained(sd_file):
    image = loaded(sd_file)
    video = loaded(sd_file, temporal=True)
    perturb_temporal(video)
    x, t, context = video_inputs(3)
    out = video(x, t, context, temporal=False)
    assert (out[:, 2] - image(x[:, 2], t, context)).abs().max() < 1e-5


@torch.no_grad()
def test_per_clip_temporal_gate_equals_separate_calls(sd_file):
    """One batched call can hold the image model's and the video model's branches."""
    video = loaded(sd_file, temporal=True)
    perturb_temporal(video)
    x, t, context = video_inputs(3)
    mixed = video(x, t, context, temporal=torch.tensor([True, False]))
    assert torch.allclose(mixed[:1], video(x[:1], t[:1], context[:1], temporal=True), atol=1e-5)
    assert torch.allclose(mixed[1:], video(x[1:], t[1:], context[1:], temporal=False), atol=1e-5)


@torch.no_grad()
def test_a_timestep_per_frame_is_each_frame_at_its_own_step(sd_file):
    """Timesteps (B, F) (a diagonal edit's queue): with the temporal layers off, frame k
    equals the image model at its own timestep; on, the frames still mix."""
    image = loaded(sd_file)
    video = loaded(sd_file, temporal=True)
    x, _, context = video_inputs(3)
    t = torch.tensor([[20, 400, 900], [5, 5, 600]])
    out = video(x, t, context, temporal=False)
    for f in range(3):
        assert (out[:, f] - image(x[:, f], t[:, f], context)).abs().max() < 1e-5
    perturb_temporal(video)
    staggered = video(x, t, context)
    assert (staggered - video(x, t, context, temporal=False)).abs().max() > 1e-3
    assert (staggered - video(x, t[:, 0], context)).abs().max() > 1e-3  # t used per frame


def test_gradient_checkpointing_gives_same_loss_and_gradients(sd_file):
    plain = loaded(sd_file, temporal=True).train()
    perturb_temporal(plain)
    checkpointed = loaded(sd_file, temporal=True, use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, context = video_inputs(3)
    losses, grads = [], []
    for unet in (plain, checkpointed):
        loss = unet(x, t, context).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(plain.parameters()))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_content_projection_maps_a_different_embedding_width():
    unet = UNet(**config("unet", "tiny"), temporal=True, content_dim=24)
    x = torch.randn(1, 2, 4, 8, 8)
    out = unet(x, torch.tensor([3]), torch.randn(1, 1, 24))
    assert out.shape == (1, 2, 4, 8, 8)
    assert unet.context_proj.in_features == 24 and unet.context_proj.out_features == 32


def test_too_many_frames_is_a_clear_error():
    unet = UNet(**config("unet", "tiny"), temporal=True, temporal_max_frames=4)
    with pytest.raises(ValueError, match="5 frames exceed"):
        unet(torch.randn(1, 5, 4, 8, 8), torch.tensor([3]), torch.randn(1, 1, 32))


def test_wrong_input_channels_is_a_clear_error():
    unet = UNet(**config("unet", "tiny"))
    with pytest.raises(ValueError, match="expects 4 input channels, got 5"):
        unet(torch.randn(1, 5, 8, 8), torch.tensor([3]), torch.randn(1, 1, 32))
