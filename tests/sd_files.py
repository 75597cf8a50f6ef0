"""Test helpers: tiny SD single files in the real key layouts, every tensor randomised, with
their inference yaml; and diffusers' own ``StableDiffusionPipeline`` assembled offline from
the same file (diffusers' converters, ``transformers``' CLIP text model and tokenizer)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from safetensors.torch import save_file

from model.encoders.depth import SD_DEPTH_PREFIX, build_midas
from model.encoders.text import SD2_PREFIX, TextConfig, build_text_encoder
from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.sd.config import IN_CHANNELS, SDConfig, write_sd_yaml
from model.weights.checkpoint import UNET_PREFIX, VAE_PREFIX
from tests.sd_layout import config, randomise

SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
# Tiny text towers: SD 1.x's in transformers' layout (one head of 64: the loader's
# width // 64 rule); SD 2.x's in open_clip's, sized as the tiny world's clip_tiny (2 heads).
TEXT = {"sd1": TextConfig(width=64, layers=2, heads=1, mlp_width=96),
        "sd2": TextConfig(width=32, layers=3, heads=2, mlp_width=128, proj_dim=32)}  # fmt: skip
TEXT_ARCH = {"sd1": None, "sd2": "clip_tiny"}


def tiny_unet_params(kind: str, conditioning: str = "text") -> dict:
    """A tiny SD 1.x- (conv projections, num_heads) or SD 2.x-shaped (linear projections,
    num_head_channels) UNet config whose cross-attention takes the tiny text width."""
    params = config("unet", "tiny" if kind == "sd1" else "tiny_sd2")
    params["context_dim"] = TEXT[kind].width
    params["in_channels"] = IN_CHANNELS[conditioning]
    return params


def tiny_config(
    kind: str = "sd1", parameterization: str = "eps", conditioning: str = "text"
) -> SDConfig:
    vae = config("vae", "tiny")
    vae["ddconfig"]["norm_groups"] = 32  # SD's (ldm's, diffusers') GroupNorm groups
    return SDConfig(
        unet={**tiny_unet_params(kind, conditioning), "use_checkpoint": False},
        vae={"embed_dim": vae["embed_dim"], "ddconfig": vae["ddconfig"]},
        text_kind=kind,
        text_arch=TEXT_ARCH[kind],
        clip_skip=1 if kind == "sd1" else 2,
        parameterization=parameterization,
        conditioning=conditioning,
        depth_model="midas_tiny" if conditioning == "depth" else None,
        image_size=8,
    )


def tiny_state(config: SDConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a tiny SD checkpoint of ``config``, randomised, in LDM's key layout."""
    unet = UNet(**config.unet)
    vae = AutoencoderKL(**config.vae, scale_factor=config.scale_factor)
    text = build_text_encoder(config.text_kind, TEXT[config.text_kind])
    state = {UNET_PREFIX + k: v for k, v in randomise(unet.state_dict(), seed).items()}
    vae_state = randomise(vae.state_dict(), seed + 1)
    vae_state["decoder.conv_out.weight"] *= 0.3  # decoded pixels mostly inside [-1, 1]
    state |= {VAE_PREFIX + k: v for k, v in vae_state.items()}
    prefix = SD1_TEXT_PREFIX if config.text_kind == "sd1" else SD2_PREFIX
    state |= {prefix + k: v for k, v in randomise(text.state_dict(), seed + 2).items()}
    if config.conditioning == "depth":
        midas = randomise(build_midas(config.depth_model).state_dict(), seed + 3)
        state |= {SD_DEPTH_PREFIX + k: v for k, v in midas.items()}
    return state


def write_tiny_sd(
    folder: Path, name: str, config: SDConfig, seed: int = 0, with_yaml: bool = True
) -> tuple[Path, dict[str, torch.Tensor]]:
    """``folder/name`` (.safetensors or .ckpt) holding ``tiny_state(config)``, and its yaml."""
    state = tiny_state(config, seed)
    path = Path(folder) / name
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    if with_yaml:
        write_sd_yaml(config, path.with_suffix(".yaml"))
    return path, state


def hf_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """SD's ``CLIPTokenizer`` rebuilt offline from open_clip's BPE list (SD 1.x pads with
    ``<|endoftext|>``, diffusers' SD 2.x tokenizer with ``!``, id 0, as open_clip does)."""
    import transformers

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(
        str(folder), pad_token=pad_token, model_max_length=77
    )


def diffusers_pipeline(state: dict, config: SDConfig, scheduler, folder: Path):
    """diffusers' ``StableDiffusionPipeline`` on the weights of ``state``: UNet and VAE through
    diffusers' LDM converters, the text encoder as ``transformers.CLIPTextModel`` (SD 2.x:
    open_clip converted, the last block dropped, as diffusers runs SD 2's penultimate layer)."""
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as single_file

    from model.sd.config import sd_yaml

    original = sd_yaml(config)
    unet_config = single_file.create_unet_diffusers_config_from_ldm(original, state)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, unet_config))
    vae_config = single_file.create_vae_diffusers_config_from_ldm(original, state)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(state, vae_config))
    t = TEXT[config.text_kind]
    sd2 = config.text_kind == "sd2"
    text_config = transformers.CLIPTextConfig(
        hidden_size=t.width,
        num_hidden_layers=t.layers - (config.clip_skip - 1),
        num_attention_heads=t.heads,
        intermediate_size=t.mlp_width,
        hidden_act="gelu" if sd2 else "quick_gelu",
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=t.proj_dim or t.width,
    )
    text = transformers.CLIPTextModel(text_config)
    if sd2:
        last = f"{SD2_PREFIX}transformer.resblocks.{t.layers - 1}."
        kept = {k: v for k, v in state.items() if not k.startswith(last)}
        converted = single_file.convert_open_clip_checkpoint(text, kept)
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    else:
        converted = {
            k[len(SD1_TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(SD1_TEXT_PREFIX)
        }
    text.load_state_dict(converted, strict=True)  # transformers 5 keys drop "text_model."
    tokenizer = hf_tokenizer(folder, "!" if sd2 else "<|endoftext|>")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
