"""The LDM <-> diffusers module names of the UNet equal diffusers' own converter's."""

import pytest
import torch

from model.nets.unet import UNet
from model.sd.diffusers_names import encoder_names, rename_keys, unet_names
from tests.sd_layout import config, randomise
from tests.test_sd_parity import original_config

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

PREFIX = "model.diffusion_model."


@pytest.mark.parametrize("name", ["tiny", "tiny_sd2", "tiny_sd"])
def test_names_equal_diffusers_conversion(name):
    params = config("unet", name)
    unet = UNet(**params)
    state = randomise(unet.state_dict(), 0)
    cfg = original_config(params, config("vae", "tiny"))
    ldm = {PREFIX + k: v for k, v in state.items()}
    diff_config = single_file.create_unet_diffusers_config_from_ldm(cfg, ldm)
    theirs = single_file.convert_ldm_unet_checkpoint(ldm, diff_config)

    names = unet_names(unet)
    ours = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        ours[f"{names[module]}.{param}"] = value
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back, unmatched = rename_keys(theirs, names)
    assert not unmatched and back.keys() == state.keys()
    encoder = encoder_names(unet)
    assert all(
        v.startswith(("down_blocks", "mid_block", "conv_in", "time_embedding"))
        for v in encoder.values()
    )


def test_temporal_layers_have_no_diffusers_name():
    unet = UNet(**config("unet", "tiny"), temporal=True)
    names = unet_names(unet)
    assert not any("temporal" in k for k in names)
    _, unmatched = rename_keys({"down_blocks.0.resnets.0.temporal.x.weight": 0}, names)
    assert unmatched
