"""The parts of an SD checkpoint, each built from an :class:`SDConfig` and loaded strictly
from the file's tensors: UNet (``model.diffusion_model.*``, or its EMA copy ``model_ema.*``),
VAE (``first_stage_model.*``), text encoder (``cond_stage_model.*``) and, for SD 2-depth,
MiDaS (``depth_model.model.*``). A missing, unexpected or misshapen key raises
``CheckpointError`` naming the file and the keys (``model.weights.checkpoint.load_strict``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from model.encoders.clip import clip_config
from model.encoders.depth import SD_DEPTH_PREFIX, DepthEstimator, build_midas
from model.encoders.text import (
    SD1_PREFIX,
    SD2_PREFIX,
    TextEncoder,
    build_text_encoder,
    config_from_state,
    text_state,
)
from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.sd.config import SDConfig
from model.weights.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    check_strict,
    select,
)

TEXT_PREFIXES = {"sd1": SD1_PREFIX, "sd2": SD2_PREFIX}


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, without it (empty when there are none: never the whole
    file, unlike ``select``, so a file lacking a part fails as missing keys)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _meta_build(build):
    """Build a module on the meta device (no random init of weights a file will replace)."""
    with torch.device("meta"):
        return build()


def _assign(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, prefix: str = ""
):
    """Strict load into a meta-built module: every key checked first (``check_strict`` names
    each mismatch; ``prefix``, the part's prefix in the file, is said with them), then the
    file's tensors taken as they are (``assign``)."""
    try:
        report, state = check_strict(module, state, path)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (keys under {prefix!r})" if prefix else str(err)) from None
    module.load_state_dict(state, strict=True, assign=True)
    report.loaded = len(state)
    unset = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if unset:
        raise CheckpointError(f"{path}: tensors not set by the file: {unset[:5]}")
    return report


def unet_state(
    state: Mapping[str, torch.Tensor], path: str | Path, use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """The UNet's tensors (LDM's EMA copies with ``use_ema``), without their prefix."""
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(f"{path}: no UNet (no keys under {UNET_PREFIX!r})")
    return select(state, UNET_PREFIX, path, use_ema)


def load_unet(
    config: SDConfig, state: Mapping[str, torch.Tensor], path: str | Path, use_ema: bool = False
) -> UNet:
    """The image UNet of ``config`` with the file's weights (exact input channels: an SD route
    model runs as the file defines it, nothing zero-filled)."""
    unet = _meta_build(lambda: UNet(**config.unet))
    _assign(unet, unet_state(state, path, use_ema), path, UNET_PREFIX)
    return unet.eval().requires_grad_(False)


def load_vae(config: SDConfig, state: Mapping[str, torch.Tensor], path: str | Path):
    """The VAE (``first_stage_model.*``; training-loss keys ``loss.*`` dropped)."""
    vae_state = {k: v for k, v in _under(state, VAE_PREFIX).items() if not k.startswith("loss.")}
    vae = _meta_build(lambda: AutoencoderKL(**config.vae, scale_factor=config.scale_factor))
    _assign(vae, vae_state, path, VAE_PREFIX)
    return vae.eval().requires_grad_(False)


def text_heads(config: SDConfig, width: int) -> int:
    """Attention heads of the text tower: its open_clip arch's (SD 2.x: ``ViT-H-14`` has 16;
    the tiny world's ``clip_tiny`` 2), else ``width // 64`` as in both SD CLIPs."""
    if config.text_kind == "sd2" and config.text_arch:
        try:
            return int(clip_config(config.text_arch)["text_cfg"]["heads"])
        except KeyError:
            pass
    return max(width // 64, 1)


def load_text(config: SDConfig, state: Mapping[str, torch.Tensor], path: str | Path) -> TextEncoder:
    """SD's text encoder (SD 1.x: ``cond_stage_model.transformer.*``; SD 2.x:
    ``cond_stage_model.model.*``), dimensions from the tensors, ``clip_skip`` from the config."""
    kind = config.text_kind
    prefix = TEXT_PREFIXES[kind]
    if not any(k.startswith(prefix) for k in state):
        raise CheckpointError(f"{path}: no {kind} text encoder (no keys under {prefix!r})")
    tensors = text_state(state, kind, path)
    text_config = config_from_state(tensors, kind, path=path)
    heads = text_heads(config, text_config.width)
    text_config = config_from_state(tensors, kind, heads=heads, path=path)
    encoder = _meta_build(lambda: build_text_encoder(kind, text_config, clip_skip=config.clip_skip))
    _assign(encoder, tensors, path, prefix)
    return encoder.float().eval().requires_grad_(False)


def load_depth(
    config: SDConfig, state: Mapping[str, torch.Tensor], path: str | Path, chunk_size: int = 8
) -> DepthEstimator:
    """SD 2-depth's MiDaS (``depth_model.model.*``), wrapped for video frames."""
    tensors = _under(state, SD_DEPTH_PREFIX)
    if not tensors:
        raise CheckpointError(
            f"{path}: a depth model (5 input channels) without its MiDaS: no keys under "
            f"{SD_DEPTH_PREFIX!r}"
        )
    net = _meta_build(lambda: build_midas(config.depth_model))
    _assign(net, tensors, path, SD_DEPTH_PREFIX)
    return DepthEstimator(net.eval().requires_grad_(False), chunk_size=chunk_size)
