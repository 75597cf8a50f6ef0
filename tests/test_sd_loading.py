"""SD checkpoints as users have them: SD's inference yaml, recognition from keys and shapes
(full-size layouts on the meta device), strict loading that names the file and the keys,
EMA copies, and ``checkpoint_kind``'s dispatch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from safetensors.torch import save_file

from model.encoders.depth import SD_DEPTH_PREFIX, build_midas
from model.encoders.text import SD1_CONFIG, SD2_CONFIG, build_text_encoder
from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.sd.config import config_from_yaml, sd_yaml
from model.sd.families import V_STATISTIC_KEY, family_name, recognise
from model.sd.files import checkpoint_kind, describe_keys
from model.sd.loading import load_sd
from model.weights.checkpoint import UNET_PREFIX, VAE_PREFIX, CheckpointError, check_strict
from tests.sd_files import SD1_TEXT_PREFIX, tiny_config, write_tiny_sd
from tests.sd_layout import ROOT, reference_keys

# The parts of SD's own inference configs that the loader reads (v1-inference.yaml,
# v2-inference-v.yaml, v2-midas-inference.yaml, v1-inpainting-inference.yaml).
UNET_V1 = """
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 32, in_channels: %d, out_channels: 4, model_channels: 320,
        attention_resolutions: [4, 2, 1], num_res_blocks: 2, channel_mult: [1, 2, 4, 4],
        num_heads: 8, use_spatial_transformer: true, transformer_depth: 1, context_dim: 768,
        use_checkpoint: true, legacy: false}"""
UNET_V2 = """
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {use_checkpoint: true, use_fp16: true, image_size: 32, in_channels: %d,
        out_channels: 4, model_channels: 320, attention_resolutions: [4, 2, 1],
        num_res_blocks: 2, channel_mult: [1, 2, 4, 4], num_head_channels: 64,
        use_spatial_transformer: true, use_linear_in_transformer: true, transformer_depth: 1,
        context_dim: 1024, legacy: false}"""
REST = """
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3,
          ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
    cond_stage_config:
      target: ldm.modules.encoders.modules.%s"""
HEAD = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.%s
  params:
    %s
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: %d
    channels: 4
    conditioning_key: %s
    scale_factor: 0.18215
    use_ema: False
    unet_config:"""
V1 = HEAD % ("LatentDiffusion", "", 64, "crossattn") + UNET_V1 % 4 + REST % "FrozenCLIPEmbedder"
V2_V = (
    HEAD % ("LatentDiffusion", 'parameterization: "v"', 96, "crossattn")
    + UNET_V2 % 4
    + REST % "FrozenOpenCLIPEmbedder"
    + '\n      params: {freeze: true, layer: "penultimate"}'
)
V2_DEPTH = (
    HEAD % ("LatentDepth2ImageDiffusion", "", 64, "hybrid")
    + UNET_V2 % 5
    + REST % "FrozenOpenCLIPEmbedder"
    + '\n      params: {freeze: true, layer: "penultimate"}'
    + "\n    depth_stage_config:\n      target: ldm.modules.midas.api.MiDaSInference"
    + "\n      params: {model_type: dpt_hybrid}"
)
V1_INPAINT = (
    HEAD % ("LatentInpaintDiffusion", "", 64, "hybrid") + UNET_V1 % 9 + REST % "FrozenCLIPEmbedder"
)


@pytest.mark.parametrize(
    "text,family,parameterization,resolution",
    [
        (V1, "SD 1.x", "eps", 512),
        (V2_V, "SD 2.x", "v", 768),
        (V2_DEPTH, "SD 2-depth", "eps", 512),
        (V1_INPAINT, "SD 1.x inpainting", "eps", 512),
    ],
)
def test_sd_inference_yamls_are_read_and_written_back(text, family, parameterization, resolution):
    config = config_from_yaml(yaml.safe_load(text), "test.yaml")
    assert family_name(config) == family and config.parameterization == parameterization
    assert config.native_resolution == resolution and config.scale_factor == 0.18215
    assert config.clip_skip == (2 if config.text_kind == "sd2" else 1)
    assert config.depth_model == ("dpt_hybrid_384" if "Depth" in text else None)
    assert config_from_yaml(sd_yaml(config)) == config  # written as SD writes it, read back
    with torch.device("meta"):
        UNet(**config.unet)  # every kept unet_config entry is one our UNet takes


@pytest.mark.parametrize(
    "change,message",
    [
        (("model.target", "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion"),
         "not an SD text-to-image"),
        (("in_channels", 5), "takes 4 input channels"),
        (("cond_stage_config.target", "sgm.FrozenT5Embedder"), "not SD's text encoder"),
        (("parameterization", "x0"), "parameterization"),
        (("unet_config.params.num_classes", "sequential"), "unCLIP"),
    ],
)  # fmt: skip
def test_unsupported_yamls_are_refused_naming_the_entry(change, message):
    data = yaml.safe_load(V1)
    params = data["model"]["params"]
    key, value = change
    if key == "model.target":
        data["model"]["target"] = value
    elif key == "in_channels":
        params["unet_config"]["params"]["in_channels"] = value
    elif key == "cond_stage_config.target":
        params["cond_stage_config"]["target"] = value
    elif key == "parameterization":
        params["parameterization"] = value
    else:
        params["unet_config"]["params"]["num_classes"] = value
    with pytest.raises(CheckpointError, match=message):
        config_from_yaml(data, "bad.yaml")


def meta_state(unet: str, in_channels: int, text: str, depth: bool = False) -> dict:
    """A full-size SD file's keys and shapes as meta tensors: the reference UNet and VAE
    layouts, the real text encoder's keys, and DPT-Hybrid under ``depth_model.model.``."""
    shapes = {UNET_PREFIX + k: s for k, s in reference_keys(unet).items()}
    conv = UNET_PREFIX + "input_blocks.0.0.weight"
    shapes[conv] = (320, in_channels, 3, 3)
    shapes |= {VAE_PREFIX + k: s for k, s in reference_keys("sd_vae").items()}
    prefix = SD1_TEXT_PREFIX if text == "sd1" else "cond_stage_model.model."
    with torch.device("meta"):
        encoder = build_text_encoder(text, SD1_CONFIG if text == "sd1" else SD2_CONFIG)
    shapes |= {prefix + k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    if depth:
        midas = reference_keys("midas_dpt_hybrid_384")
        shapes |= {SD_DEPTH_PREFIX + k: s for k, s in midas.items()}
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize(
    "unet,in_channels,text,depth,family",
    [
        ("sd15_unet", 4, "sd1", False, "SD 1.x"),
        ("sd21_unet", 4, "sd2", False, "SD 2.x"),
        ("sd2_depth_unet", 5, "sd2", True, "SD 2-depth"),
        ("sd15_unet", 9, "sd1", False, "SD 1.x inpainting"),
        ("sd21_unet", 9, "sd2", False, "SD 2.x inpainting"),
    ],
)
def test_full_size_layouts_are_recognised_and_fit_exactly(unet, in_channels, text, depth, family):
    state = meta_state(unet, in_channels, text, depth)
    config = recognise(state, "model.safetensors")
    assert family_name(config) == family and config.parameterization == "eps"
    assert "recognised from keys" in config.source
    with torch.device("meta"):
        parts = {UNET_PREFIX: UNet(**config.unet), VAE_PREFIX: AutoencoderKL(**config.vae)}
        if depth:
            parts[SD_DEPTH_PREFIX] = build_midas(config.depth_model)
    for prefix, module in parts.items():
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        check_strict(module, part, "model.safetensors")  # every key, every shape


@pytest.mark.parametrize("spread,expected", [(0.2, "v"), (0.01, "eps")])
def test_sd2_eps_or_v_follows_comfyuis_statistic(spread, expected):
    state = meta_state("sd21_unet", 4, "sd2")
    bias = torch.randn(640, generator=torch.Generator().manual_seed(0))
    state[UNET_PREFIX + V_STATISTIC_KEY] = bias / bias.std(unbiased=False) * spread
    config = recognise(state)
    assert config.parameterization == expected and f"{spread:.3f}" in config.source
    assert config.native_resolution == (768 if expected == "v" else 512)


@pytest.mark.parametrize(
    "keys,looks_like",
    [
        ({"conditioner.embedders.0.transformer.x": (1,)}, "SDXL"),
        ({"lora_unet_down_blocks_0.lora_down.weight": (4, 8)}, "LoRA"),
        ({"encoder.down.0.block.0.conv1.weight": (1,), "decoder.up.0.x": (1,)}, "standalone VAE"),
        ({"control_model.input_hint_block.0.weight": (1,)}, "ControlNet"),
        ({"pretrained.model.cls_token": (1,), "scratch.x": (1,)}, "MiDaS"),
    ],
)
def test_files_that_are_no_sd_say_what_they_look_like(keys, looks_like, tmp_path):
    assert looks_like in describe_keys(keys)
    path = tmp_path / "thing.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(CheckpointError, match=looks_like) as err:
        checkpoint_kind(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=looks_like):
        load_sd(path)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd1"), "tiny.safetensors", tiny_config("sd1"))


def test_a_file_of_no_known_family_without_yaml_asks_for_it(tiny_sd1, tmp_path):
    _, state = tiny_sd1
    bare = tmp_path / "no_yaml.safetensors"
    save_file(state, str(bare))
    with pytest.raises(CheckpointError, match="no known SD family.*yaml beside it"):
        load_sd(bare)
    model = load_sd(bare, config=tiny_sd1[0].with_suffix(".yaml"))  # or given explicitly
    assert model.config.text_kind == "sd1"


@pytest.mark.parametrize(
    "edit,kind,key",
    [
        ("drop", "1 missing keys", "input_blocks.1.1.proj_out.weight"),
        ("add", "1 unexpected keys", "input_blocks.1.1.extra.weight"),
        ("shape", "1 keys with wrong shapes", "out.2.weight"),
    ],
)
def test_strict_loading_names_the_file_and_the_keys(tiny_sd1, tmp_path, edit, kind, key):
    source, state = tiny_sd1
    state = dict(state)
    full = UNET_PREFIX + key
    if edit == "drop":
        del state[full]
    elif edit == "add":
        state[full] = torch.zeros(3)
    else:
        state[full] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    path.with_suffix(".yaml").write_text(source.with_suffix(".yaml").read_text())
    with pytest.raises(CheckpointError) as err:
        load_sd(path)
    message = str(err.value)
    assert str(path) in message and kind in message and key in message
    assert UNET_PREFIX in message


def test_keys_of_no_part_are_refused(tiny_sd1, tmp_path):
    source, state = tiny_sd1
    path = tmp_path / "merged.safetensors"
    save_file({**state, "control_model.zero_convs.0.0.weight": torch.zeros(1)}, str(path))
    path.with_suffix(".yaml").write_text(source.with_suffix(".yaml").read_text())
    with pytest.raises(CheckpointError, match="unexpected keys: control_model.zero_convs"):
        load_sd(path)


def test_ema_copies_are_ldms_and_ckpt_files_load(tmp_path):
    config = tiny_config("sd1")
    path, state = write_tiny_sd(tmp_path, "ema.ckpt", config)
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    ema = {"model_ema." + ("diffusion_model." + k[len(UNET_PREFIX) :]).replace(".", ""):
           state[k] + 1.0 for k in unet_keys}  # fmt: skip
    full = {**state, **ema, "model_ema.decay": torch.tensor(0.9999), "betas": torch.zeros(1000)}
    torch.save({"state_dict": full, "global_step": 10}, path)
    assert checkpoint_kind(path) == "sd"
    plain, averaged = load_sd(path), load_sd(path, use_ema=True)
    key = "input_blocks.0.0.weight"
    assert torch.equal(plain.unet.state_dict()[key], state[UNET_PREFIX + key])
    assert torch.equal(averaged.unet.state_dict()[key], state[UNET_PREFIX + key] + 1.0)
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="use_ema asked for"):
        load_sd(path, use_ema=True)


def test_parameterization_and_clip_skip_override_the_yaml(tiny_sd1):
    path, _ = tiny_sd1
    assert load_sd(path).parameterization == "eps"
    model = load_sd(path, parameterization="v", clip_skip=2)
    assert model.parameterization == "v" and model.text_encoder.clip_skip == 2
    with pytest.raises(CheckpointError, match="parameterization"):
        load_sd(path, parameterization="x0")


def test_checkpoint_kind_dispatches_without_loading(tiny_sd1, tmp_path):
    bundle = ROOT / "bundle" / "tiny_world" / "gen1_tiny_world.safetensors"
    assert checkpoint_kind(bundle) == "gen1-release"
    assert checkpoint_kind(tiny_sd1[0]) == "sd"
    lightning = tmp_path / "gen1.ckpt"
    hparams = {"unet": {}, "vae": {}, "clip": {}}
    torch.save({"state_dict": {"unet.out.2.weight": torch.zeros(1)}, "hyper_parameters": hparams},
               lightning)  # fmt: skip
    assert checkpoint_kind(lightning) == "gen1-lightning"
    with pytest.raises(FileNotFoundError):
        checkpoint_kind(tmp_path / "missing.safetensors")


def test_loaded_model_is_the_files_weights_in_float32(tiny_sd1):
    path, state = tiny_sd1
    model = load_sd(path)
    for prefix, part in ((UNET_PREFIX, model.unet), (VAE_PREFIX, model.vae)):
        for key, value in part.state_dict().items():
            assert value.dtype == torch.float32 and torch.equal(value, state[prefix + key])
    assert not any(p.requires_grad for p in model.parameters())
    assert dataclasses.asdict(model.config)["text_kind"] == "sd1"
