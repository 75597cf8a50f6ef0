"""Loading an SD single-file checkpoint as users have it into a ``StableDiffusion``.

The architecture comes, in this order, from: an explicit ``config`` (an ``SDConfig``, a
parsed yaml or a yaml path); SD's inference ``.yaml`` beside the file (same stem, A1111's and
ComfyUI's convention); or the file's keys and shapes (``model.sd.families.recognise``). An
explicit ``parameterization`` overrides all three (SD 2.x eps / v cannot be read from keys).
Every part loads strictly: a missing, unexpected or misshapen key raises ``CheckpointError``
naming the file and the keys, and so does a top-level key that belongs to no part.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from model.diffusion.schedule import check_parameterization
from model.encoders.depth import SD_DEPTH_PREFIX
from model.sd.components import TEXT_PREFIXES, load_depth, load_text, load_unet, load_vae
from model.sd.config import SDConfig, config_from_yaml, read_sd_yaml
from model.sd.families import V_STATISTIC_KEY, recognise
from model.sd.files import peek, yaml_beside
from model.sd.model import StableDiffusion
from model.weights.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    read_state_dict,
)

log = logging.getLogger(__name__)

# Buffers LDM's DDPM registers (its schedule), which full SD files carry: not weights.
LDM_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod "
    "sqrt_one_minus_alphas_cumprod log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod "
    "sqrt_recipm1_alphas_cumprod posterior_variance posterior_log_variance_clipped "
    "posterior_mean_coef1 posterior_mean_coef2 logvar lvlb_weights "
    "model_ema.decay model_ema.num_updates".split()
)


def resolve_config(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    config: SDConfig | Mapping | str | Path | None = None,
) -> SDConfig:
    """The architecture of the checkpoint at ``path``: ``config`` if given, else the yaml
    beside it, else recognised from ``state``'s keys and shapes."""
    if isinstance(config, SDConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_yaml(config, source="config given")
    yaml_path = Path(config) if config is not None else yaml_beside(path)
    if yaml_path is not None:
        if not yaml_path.is_file():
            raise FileNotFoundError(f"SD inference config not found: {yaml_path}")
        return config_from_yaml(read_sd_yaml(yaml_path), source=str(yaml_path))
    return recognise(state, path)


def check_top_level(state: Mapping[str, torch.Tensor], config: SDConfig, path: str | Path) -> None:
    """Refuse keys that belong to no part of ``config``'s model (a merged ControlNet, an SDXL
    conditioner, another model's MiDaS...)."""
    prefixes = [UNET_PREFIX, VAE_PREFIX, TEXT_PREFIXES[config.text_kind], "model_ema."]
    if config.conditioning == "depth":
        prefixes.append(SD_DEPTH_PREFIX)
    stray = [k for k in state if k not in LDM_BUFFERS and not k.startswith(tuple(prefixes))]
    if stray:
        raise CheckpointError(
            f"{path} does not fit an {config.source or 'SD'} model: {len(stray)} unexpected "
            f"keys: {', '.join(sorted(stray)[:5])}{' ...' if len(stray) > 5 else ''}"
        )


def load_sd(
    path: str | Path,
    *,
    config: SDConfig | Mapping | str | Path | None = None,
    use_ema: bool = False,
    parameterization: str | None = None,
    clip_skip: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> StableDiffusion:
    """A ``StableDiffusion`` (eval, frozen, float32, CPU) from an SD single file.

    ``path``: ``.safetensors`` or ``.ckpt`` / ``.pt`` (read as data only, tensors mapped from
    disk; a Lightning ``state_dict`` is unwrapped). ``config``: see ``resolve_config``.
    ``use_ema``: the UNet from LDM's EMA copies (``model_ema.*``; an error if the file has
    none, as ``-emaonly`` files). ``parameterization`` ("eps" / "v") and ``clip_skip``
    override the config's. ``state``: the file's tensors when already read.

    Raises ``FileNotFoundError``, or ``CheckpointError`` naming the file and the keys.
    """
    path = Path(path)
    state = read_state_dict(path) if state is None else state
    sd_config = resolve_config(path, state, config)
    overrides = {}
    if parameterization is not None:
        try:
            overrides["parameterization"] = check_parameterization(parameterization)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err
    if clip_skip is not None:
        overrides["clip_skip"] = clip_skip
    if overrides:
        sd_config = dataclasses.replace(sd_config, **overrides)
    check_top_level(state, sd_config, path)
    unet = load_unet(sd_config, state, path, use_ema)
    vae = load_vae(sd_config, state, path)
    text = load_text(sd_config, state, path)
    depth = load_depth(sd_config, state, path) if sd_config.conditioning == "depth" else None
    log.info("%s: %s (%s)", path, sd_config.source, sd_config.parameterization)
    model = StableDiffusion(sd_config, unet, vae, text, depth, path=path)
    return model.float().eval().requires_grad_(False)


def peek_config(
    path: str | Path, config: SDConfig | Mapping | str | Path | None = None
) -> SDConfig:
    """The architecture of an SD file without reading its weights: ``resolve_config`` over its
    keys and shapes, plus, for a ``.safetensors``, the one tensor SD 2.x's eps/v rule reads.
    (For ``editing`` to choose a working size before the weights load.)"""
    path = Path(path)
    shapes = peek(path).shapes
    state: dict[str, torch.Tensor] = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    rule_key = UNET_PREFIX + V_STATISTIC_KEY
    if rule_key in state and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            state[rule_key] = f.get_tensor(rule_key)
    return resolve_config(path, state, config)
