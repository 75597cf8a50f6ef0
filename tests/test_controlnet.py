"""ControlNet: our network and loader against diffusers' ``ControlNetModel`` and its converter
of the original (``cldm``) layout, on random weights in the real layouts."""

import pytest
import torch
from safetensors.torch import save_file

from model.nets.controlnet import ControlNet
from model.nets.unet import UNet
from model.sd.controlnet import load_controlnet
from model.weights.checkpoint import CheckpointError
from tests.sd_layout import config, randomise
from tests.test_sd_parity import original_config

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
import diffusers  # noqa: E402

TOL = 1e-4


def diffusers_controlnet(params: dict, state: dict) -> "diffusers.ControlNetModel":
    """diffusers' ControlNetModel on an original-layout state, through diffusers' converter."""
    cfg = original_config(params, config("vae", "tiny"))
    # create_controlnet_diffusers_config_from_ldm (diffusers 0.42) calls the UNet's config
    # builder without its checkpoint argument; these are the lines it runs, fixed.
    unet_keys = {"model.diffusion_model." + k[len("control_model.") :]: v for k, v in state.items()}
    unet = single_file.create_unet_diffusers_config_from_ldm(cfg, unet_keys)
    shared = "in_channels down_block_types block_out_channels layers_per_block "
    shared += "cross_attention_dim attention_head_dim use_linear_projection class_embed_type "
    shared += "addition_embed_type addition_time_embed_dim "
    shared += "projection_class_embeddings_input_dim transformer_layers_per_block"
    cn_config = {"conditioning_channels": 3} | {k: unet[k] for k in shared.split()}
    converted = single_file.convert_controlnet_checkpoint(state, cn_config)
    net = diffusers.ControlNetModel(**cn_config).eval()
    net.load_state_dict(converted, strict=True)
    return net


def diffusers_unet(params: dict, unet_state: dict) -> "diffusers.UNet2DConditionModel":
    cfg = original_config(params, config("vae", "tiny"))
    ldm = {"model.diffusion_model." + k: v for k, v in unet_state.items()}
    unet_config = single_file.create_unet_diffusers_config_from_ldm(cfg, ldm)
    unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(ldm, unet_config), strict=True)
    return unet


@pytest.fixture(scope="module", params=["tiny", "tiny_sd2"])
def controlnet_file(request, tmp_path_factory):
    """A random ControlNet in the original layout (``control_model.*``) for a tiny base."""
    params = config("unet", request.param)
    state = randomise(ControlNet(**params).state_dict(), 5)  # zero convs non-zero too
    path = tmp_path_factory.mktemp("cn") / f"control_{request.param}.safetensors"
    save_file({"control_model." + k: v for k, v in state.items()}, str(path))
    return path, params, state


def inputs(params, batch=2, size=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, params["in_channels"], size, size, generator=gen)
    hint = torch.rand(batch, 3, 8 * size, 8 * size, generator=gen)
    context = torch.randn(batch, 7, params["context_dim"], generator=gen)
    return x, torch.tensor([10, 700][:batch]), context, hint


@torch.no_grad()
def test_residuals_and_controlled_unet_equal_diffusers(controlnet_file):
    path, params, state = controlnet_file
    ours = load_controlnet(path, params)
    theirs = diffusers_controlnet(params, {"control_model." + k: v for k, v in state.items()})
    x, t, context, hint = inputs(params)
    residuals = ours(x, t, context, hint)
    down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert len(residuals) == len(down) + 1
    for a, b in zip(residuals, [*down, mid], strict=True):
        assert a.abs().max() > 0.01 and (a - b).abs().max() < TOL

    unet_state = randomise(UNet(**params).state_dict(), 6)
    unet = UNet(**params).eval()
    unet.load_state_dict(unet_state)
    reference = diffusers_unet(params, unet_state)
    scale = 0.7
    out = unet(x, t, context, control=[scale * r for r in residuals])
    expected = reference(
        x,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=[scale * d for d in down],
        mid_block_additional_residual=scale * mid,
    ).sample
    assert (out - expected).abs().max() < TOL
    assert (out - unet(x, t, context)).abs().max() > 0.01  # the control changed the output


@torch.no_grad()
def test_diffusers_layout_loads_to_the_same_network(controlnet_file, tmp_path):
    path, params, state = controlnet_file
    theirs = diffusers_controlnet(params, {"control_model." + k: v for k, v in state.items()})
    theirs.save_pretrained(tmp_path / "controlnet")
    x, t, context, hint = inputs(params)
    expected = load_controlnet(path, params)(x, t, context, hint)
    for where in (
        tmp_path / "controlnet",
        tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors",
    ):
        got = load_controlnet(where, params)(x, t, context, hint)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_bare_keys_load_and_mismatches_name_the_file(controlnet_file, tmp_path):
    path, params, state = controlnet_file
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    assert load_controlnet(bare, params) is not None  # thibaud's SD 2.x files: no prefix
    other = (
        "tiny_sd2" if params["context_dim"] != config("unet", "tiny_sd2")["context_dim"] else "tiny"
    )
    with pytest.raises(CheckpointError, match=f"{path}.*wrong shapes.*attn2"):
        load_controlnet(path, config("unet", other))
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in state.items() if "zero_convs.1." not in k}, str(broken))
    with pytest.raises(
        CheckpointError, match=r"broken.safetensors.*missing keys: zero_convs\.1\.0"
    ):
        load_controlnet(broken, params)
    not_cn = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(not_cn))
    with pytest.raises(CheckpointError, match="is not a ControlNet"):
        load_controlnet(not_cn, params)
    with pytest.raises(FileNotFoundError, match="ControlNet file not found"):
        load_controlnet(tmp_path / "nope.safetensors", params)


@torch.no_grad()
def test_a_unit_acts_on_the_frames_at_its_steps_when_frames_have_their_own(controlnet_file):
    """Timesteps per frame (a diagonal edit): a unit acting on the last half of the steps
    adds its residuals to the frames at those steps only, each as a call at that step."""
    from model.sd.control import Control, ControlUnit

    path, params, _ = controlnet_file
    net = load_controlnet(path, params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, params["in_channels"], 8, 8, generator=gen)
    hint = torch.rand(1, 2, 3, 64, 64, generator=gen)
    context = torch.randn(1, 7, params["context_dim"], generator=gen)
    control = Control((ControlUnit(net, hint, 0.8, 0.5, 1.0),)).for_steps(
        torch.tensor([900.0, 600.0, 300.0, 100.0])
    )
    t = torch.tensor([[900.0, 100.0]])  # frame 0 at step 0 (unit off), frame 1 at step 3
    both = control.residuals(x, t, context, hint)
    late = control.residuals(x[:, 1:], t[:, 1], context, hint[:, 1:])
    assert control.residuals(x[:, :1], t[:, 0], context, hint[:, :1]) is None
    for joint, alone in zip(both, late, strict=True):
        assert joint[0].abs().max() == 0
        torch.testing.assert_close(joint[1:], alone, atol=1e-4, rtol=1e-4)  # batch of 2 vs 1
