"""Parity with the original ``ldm`` code and with diffusers on one random SD-layout file.

A checkpoint in the original SD layout, every tensor randomised, is written to disk; it
loads strictly into our UNet and VAE, into ``ldm``'s, and through diffusers' own converter
into diffusers'; all three compute the same outputs.
"""

import pytest
import torch
from safetensors.torch import save_file

from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.weights.checkpoint import UNET_PREFIX, VAE_PREFIX, load_sd_unet, load_sd_vae
from tests.sd_layout import config, randomise

ldm_openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
ldm_autoencoder = pytest.importorskip("ldm.models.autoencoder")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
import diffusers  # noqa: E402

TOL = 1e-4


def original_config(unet_params: dict, vae_params: dict) -> dict:
    """An SD inference config (as its yaml reads) for diffusers' converters."""
    return {
        "model": {
            "params": {
                "scale_factor": vae_params["scale_factor"],
                "unet_config": {"params": {**unet_params, "image_size": 32}},
                "first_stage_config": {
                    "params": {
                        "embed_dim": vae_params["embed_dim"],
                        "ddconfig": vae_params["ddconfig"],
                    }
                },
            }
        }
    }


@pytest.fixture(scope="module", params=["tiny", "tiny_sd2"])
def sd_file(request, tmp_path_factory):
    """A random SD-layout checkpoint of a tiny SD1- or SD2-shaped model, and its configs."""
    unet_params, vae_params = config("unet", request.param), config("vae", "tiny")
    # SD's (and ldm's) GroupNorm has 32 groups; the tiny world's VAE uses fewer
    vae_params["ddconfig"]["norm_groups"] = 32
    unet, vae = UNet(**unet_params), AutoencoderKL(**vae_params)
    state = {UNET_PREFIX + k: v for k, v in randomise(unet.state_dict(), 1).items()}
    state |= {VAE_PREFIX + k: v for k, v in randomise(vae.state_dict(), 2).items()}
    path = tmp_path_factory.mktemp("sd") / f"{request.param}.safetensors"
    save_file(state, str(path))
    return path, state, unet_params, vae_params


def unet_inputs(unet_params):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet_params["in_channels"], 16, 16, generator=gen)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 7, unet_params["context_dim"], generator=gen)
    return x, t, context


@torch.no_grad()
def test_unet_matches_ldm_and_diffusers(sd_file):
    path, state, unet_params, vae_params = sd_file
    ours = UNet(**unet_params).eval()
    load_sd_unet(ours, path)

    bare = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    ldm_unet = ldm_openaimodel.UNetModel(
        image_size=32, legacy=False, use_spatial_transformer=True, **unet_params
    ).eval()
    ldm_unet.load_state_dict(bare, strict=True)

    cfg = original_config(unet_params, vae_params)
    diff_config = single_file.create_unet_diffusers_config_from_ldm(cfg, state)
    converted = single_file.convert_ldm_unet_checkpoint(state, diff_config)
    diff_unet = diffusers.UNet2DConditionModel(**diff_config).eval()
    diff_unet.load_state_dict(converted, strict=True)

    x, t, context = unet_inputs(unet_params)
    out = ours(x, t, context)
    reference = ldm_unet(x, t, context=context)
    via_diffusers = diff_unet(x, t, encoder_hidden_states=context).sample
    assert out.abs().max() > 0.1  # a real signal, not zeros
    assert (out - reference).abs().max() < TOL
    assert (out - via_diffusers).abs().max() < TOL
    # Any latent size (diffusers' forward_upsample_size; ldm cannot): odd sides halved on the
    # way down come back to the skip connection's size.
    odd = x[:, :, :13, :7]
    out = ours(odd, t, context)
    assert out.shape == odd.shape
    assert (out - diff_unet(odd, t, encoder_hidden_states=context).sample).abs().max() < TOL


@torch.no_grad()
def test_vae_matches_ldm_and_diffusers(sd_file):
    path, state, unet_params, vae_params = sd_file
    ours = AutoencoderKL(**vae_params).eval()
    load_sd_vae(ours, path)

    bare = {k[len(VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    ldm_vae = ldm_autoencoder.AutoencoderKL(
        ddconfig=vae_params["ddconfig"],
        lossconfig={"target": "torch.nn.Identity"},
        embed_dim=vae_params["embed_dim"],
    ).eval()
    ldm_vae.load_state_dict(bare, strict=True)

    cfg = original_config(unet_params, vae_params)
    diff_config = single_file.create_vae_diffusers_config_from_ldm(cfg, state)
    converted = single_file.convert_ldm_vae_checkpoint(state, diff_config)
    diff_vae = diffusers.AutoencoderKL(**diff_config).eval()
    diff_vae.load_state_dict(converted, strict=True)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    scale = vae_params["scale_factor"]
    latents = ours.encode(images)
    assert (latents / scale - ldm_vae.encode(images).mean).abs().max() < TOL
    assert (latents / scale - diff_vae.encode(images).latent_dist.mean).abs().max() < TOL
    decoded = ours.decode(latents)
    assert (decoded - ldm_vae.decode(latents / scale)).abs().max() < TOL
    assert (decoded - diff_vae.decode(latents / scale).sample).abs().max() < TOL


@torch.no_grad()
def test_video_encode_decode_equals_per_frame_in_chunks(sd_file):
    """Chunked video encode/decode gives the per-image result, frame by frame."""
    path, _, _, vae_params = sd_file
    vae = AutoencoderKL(**vae_params, chunk_size=2).eval()
    load_sd_vae(vae, path)
    video = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, 5, 4, 4, 4)
    assert torch.allclose(latents[1, 3], vae.encode(video[1, 3:4])[0], atol=1e-5)
    frames = vae.decode(latents)
    assert frames.shape == video.shape
    assert torch.allclose(frames[0, 4], vae.decode(latents[0, 4:5])[0], atol=1e-5)


@torch.no_grad()
def test_cross_frame_attention_matches_text2video_zero(sd_file):
    """First-frame anchors equal diffusers' Text2Video-Zero ``CrossFrameAttnProcessor2_0`` on
    the same random weights: every frame's self-attention takes the first frame's keys and
    values; frame 0 is unchanged, the others depend on frame 0's input."""
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        CrossFrameAttnProcessor2_0,
    )

    path, state, unet_params, vae_params = sd_file
    ours = UNet(**unet_params).eval()
    load_sd_unet(ours, path)
    cfg = original_config(unet_params, vae_params)
    diff_config = single_file.create_unet_diffusers_config_from_ldm(cfg, state)
    diff_unet = diffusers.UNet2DConditionModel(**diff_config).eval()
    diff_unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, diff_config))
    diff_unet.set_attn_processor(CrossFrameAttnProcessor2_0(batch_size=2))

    x, _, context = unet_inputs(unet_params)  # 2 clips
    frames = torch.stack([x, x.roll(3, -1), x.flip(-2)], dim=1)  # (2 clips, 3 frames, ...)
    t = torch.tensor([10, 900])
    first = torch.zeros(3, 1, dtype=torch.long)
    out = ours(frames, t, context, temporal=False, anchors=first)
    reference = diff_unet(
        frames.flatten(0, 1),
        t.repeat_interleave(3),
        encoder_hidden_states=context.repeat_interleave(3, 0),
    ).sample.unflatten(0, (2, 3))
    assert (out - reference).abs().max() < TOL
    plain = ours(frames, t, context, temporal=False)
    assert (out[:, 0] - plain[:, 0]).abs().max() < TOL  # the anchor frame attends to itself
    assert (out[:, 1:] - plain[:, 1:]).abs().max() > 1e-3  # the others attend to frame 0
    assert (
        ours(frames, t, context, temporal=False, anchors=torch.arange(3)[:, None]) - plain
    ).abs().max() < TOL
