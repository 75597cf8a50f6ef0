"""The full-size configs reproduce the reference SD key layouts exactly (keys and shapes)."""

import pytest
import torch

from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from tests.sd_layout import config, reference_keys, shapes


@pytest.mark.parametrize(
    "name, reference, params_m",
    [
        ("sd15", "sd15_unet", 859.52),
        ("sd21", "sd21_unet", 865.91),
        ("sd2_depth", "sd2_depth_unet", 865.91),
    ],
)
def test_unet_configs_match_reference_layout(name, reference, params_m):
    with torch.device("meta"):
        unet = UNet(**config("unet", name))
    assert shapes(unet) == reference_keys(reference)
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


def test_vae_config_matches_reference_layout():
    with torch.device("meta"):
        vae = AutoencoderKL(**config("vae", "sd"))
    assert shapes(vae) == reference_keys("sd_vae")
    assert sum(p.numel() for p in vae.parameters()) / 1e6 == pytest.approx(83.65, abs=0.01)


def test_temporal_unet_keeps_every_sd_key():
    """Temporal layers only add keys; every SD key keeps its path and shape."""
    with torch.device("meta"):
        unet = UNet(**config("unet", "sd15"), temporal=True)
    ours = shapes(unet)
    reference = reference_keys("sd15_unet")
    assert {k: ours[k] for k in reference} == reference
    added = set(ours) - set(reference)
    assert added and all(".temporal." in k for k in added)
