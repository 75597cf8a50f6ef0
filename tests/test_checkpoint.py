"""Checkpoint reading and strict loading: formats, EMA, fp16, expansion, and clear errors."""

import re

import pytest
import torch
from safetensors.torch import save_file

from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.weights.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    load_sd_unet,
    load_sd_vae,
    read_state_dict,
)
from tests.sd_layout import config, randomise


class NotAWeight:
    """A class a pickled checkpoint names; loading must never instantiate it."""

    created = 0

    def __init__(self):
        NotAWeight.created += 1


@pytest.fixture(scope="module")
def unet_state():
    return randomise(UNet(**config("unet", "tiny")).state_dict(), 0)


def sd_checkpoint(unet_state, **extra):
    return {UNET_PREFIX + k: v for k, v in unet_state.items()} | extra


def same_weights(module, state):
    return all(torch.equal(module.state_dict()[k], v.to(torch.float32)) for k, v in state.items())


def test_ckpt_with_state_dict_wrapper_and_foreign_objects(tmp_path, unet_state):
    path = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": sd_checkpoint(unet_state), "callbacks": NotAWeight(), "global_step": 7},
        path,
    )
    created = NotAWeight.created
    unet = UNet(**config("unet", "tiny"))
    report = load_sd_unet(unet, path)
    assert NotAWeight.created == created
    assert report.loaded == len(unet_state) and not report.initialised
    assert same_weights(unet, unet_state)


def test_ema_copy_is_taken_when_asked(tmp_path, unet_state):
    ema = {"model_ema.diffusion_model" + k.replace(".", ""): v + 1.0 for k, v in unet_state.items()}
    path = tmp_path / "ema.safetensors"
    save_file(sd_checkpoint(unet_state, **ema), str(path))
    unet = UNet(**config("unet", "tiny"))
    load_sd_unet(unet, path, use_ema=True)
    assert same_weights(unet, {k: v + 1.0 for k, v in unet_state.items()})
    load_sd_unet(unet, path, use_ema=False)
    assert same_weights(unet, unet_state)


def test_ema_asked_but_absent_names_file(tmp_path, unet_state):
    path = tmp_path / "no_ema.safetensors"
    save_file(sd_checkpoint(unet_state), str(path))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*EMA"):
        load_sd_unet(UNet(**config("unet", "tiny")), path, use_ema=True)


def test_fp16_file_loads_into_fp32_model(tmp_path, unet_state):
    half = {k: v.half() for k, v in unet_state.items()}
    path = tmp_path / "half.safetensors"
    save_file(sd_checkpoint(half), str(path))
    unet = UNet(**config("unet", "tiny"))
    load_sd_unet(unet, path)
    assert unet.input_blocks[0][0].weight.dtype == torch.float32
    assert same_weights(unet, half)


def test_fewer_input_channels_are_zero_filled(tmp_path, unet_state):
    """An SD 1.x file in a structure-conditioned UNet: the extra channel starts at zero."""
    path = tmp_path / "sd.safetensors"
    save_file(sd_checkpoint(unet_state), str(path))
    image_unet = UNet(**config("unet", "tiny")).eval()
    load_sd_unet(image_unet, path)
    depth_unet = UNet(**{**config("unet", "tiny"), "in_channels": 5}).eval()
    report = load_sd_unet(depth_unet, path)
    assert report.zero_filled == ["input_blocks.0.0.weight (4 -> 5)"]
    x = torch.randn(1, 4, 8, 8)
    structure, context = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 32)
    with torch.no_grad():
        expected = image_unet(x, torch.tensor([500]), context)
        got = depth_unet(torch.cat([x, structure], 1), torch.tensor([500]), context)
    assert torch.allclose(got, expected, atol=1e-6)


def test_temporal_unet_reports_new_keys_and_still_fails_on_others(tmp_path, unet_state):
    path = tmp_path / "sd.safetensors"
    save_file(sd_checkpoint(unet_state), str(path))
    video_unet = UNet(**config("unet", "tiny"), temporal=True)
    report = load_sd_unet(video_unet, path)
    assert report.initialised and all(".temporal." in k for k in report.initialised)
    assert len(report.initialised) == len(video_unet.state_dict()) - len(unet_state)

    extra = tmp_path / "extra.safetensors"
    save_file(
        sd_checkpoint(unet_state, **{UNET_PREFIX + "stray.weight": torch.ones(1)}), str(extra)
    )
    with pytest.raises(CheckpointError, match="1 unexpected keys: stray.weight"):
        load_sd_unet(UNet(**config("unet", "tiny"), temporal=True), extra)


def test_missing_keys_error_names_file_keys_and_count(tmp_path, unet_state):
    partial = {k: v for k, v in unet_state.items() if not k.startswith("out.")}
    path = tmp_path / "partial.safetensors"
    save_file(sd_checkpoint(partial), str(path))
    with pytest.raises(CheckpointError) as err:
        load_sd_unet(UNet(**config("unet", "tiny")), path)
    message = str(err.value)
    assert str(path) in message
    assert "4 missing keys: out.0.bias, out.0.weight, out.2.bias, out.2.weight" in message


def test_wrong_shape_error_names_key_and_shapes(tmp_path, unet_state):
    bad = dict(unet_state)
    bad["time_embed.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd_checkpoint(bad), str(path))
    with pytest.raises(CheckpointError, match=r"time_embed\.0\.weight \(file \(3, 3\), model"):
        load_sd_unet(UNet(**config("unet", "tiny")), path)


def test_truncated_safetensors_names_file(tmp_path, unet_state):
    good = tmp_path / "good.safetensors"
    save_file(sd_checkpoint(unet_state), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(truncated))):
        read_state_dict(truncated)


def test_text_file_named_ckpt_names_file(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_state_dict(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        read_state_dict(tmp_path / "nowhere.safetensors")


def test_vae_loads_from_full_checkpoint_ignoring_unet(tmp_path, unet_state):
    vae = AutoencoderKL(**config("vae", "tiny"))
    vae_state = randomise(vae.state_dict(), 5)
    path = tmp_path / "full.safetensors"
    save_file(
        sd_checkpoint(unet_state) | {VAE_PREFIX + k: v for k, v in vae_state.items()}, str(path)
    )
    load_sd_vae(vae, path)
    assert same_weights(vae, vae_state)
