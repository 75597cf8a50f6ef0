"""The settings of one edit: what they are, where they come from, and their checks.

``EditSettings`` holds the sampling settings (``configs/infer.yaml`` documents each);
``check_settings`` refuses an out-of-range value in one line before any compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from model.diffusion.samplers import resolve_sampler, sampler_kwargs
from model.diffusion.windows import window_slices
from model.editing.methods import get_method
from model.nets.temporal import TemporalAttention


@dataclass
class EditSettings:
    """Sampling settings of one edit (see ``configs/infer.yaml`` for their meaning)."""

    steps: int = 20
    sampler: str = "dpmpp_2m"
    schedule: str | None = None  # None: the sampler's default (karras; trailing for ddim)
    t_s: int = 3
    w: float = 7.5
    w_t: float = 1.0
    strength: float = 1.0
    noise_correlation: float = 0.0  # share of the initial noise common to all frames (0..1)
    eta: float | None = None  # stochastic samplers only; None keeps the sampler's default
    window_length: int = 8
    window_overlap: int = 2
    chunk_size: int = 8  # frames per VAE / depth call
    keep_unmasked_pixels: bool = True  # paste source pixels outside the mask after decoding
    # fp32 on the CPU, weights prepacked for oneDNN (model.weights.prepack): "auto" where each
    # layer is measured faster so (model.weights.calibration), True every layer, False none
    prepack: bool | str = "auto"
    # False: the last step lands on timestep 0's noise level (alphas_cumprod[0]) instead of
    # on clean latents, as SD's own DDIM configs do (diffusers' set_alpha_to_one=False, ldm's
    # DDIMSampler); only to reproduce those exactly.
    set_alpha_to_one: bool = True
    # The source's latents where the edit starts from them (strength < 1, masks): "mean" of
    # the VAE posterior (the same for identical frames: steadier video), or a "sample" drawn
    # from the seed before the starting noise, as diffusers' and A1111's img2img do (to
    # reproduce their images exactly).
    source_latents: str = "mean"
    method: str | None = None  # how frames are made consistent (None: the model's default)
    # Method settings (model.editing.methods; infer.yaml's cross_frame.*, prev_frame.*,
    # multi_frame.* keys): cross_frame's anchor frames (first | first_previous | self | a list
    # of keyframe indices), prev_frame's warp of the previous output by the input's motion,
    # multi_frame's canvas layout, left to right.
    anchors: str | tuple[int, ...] = "first"
    warp: bool = True
    canvas: tuple[str, ...] = ("previous", "current", "first")


# EditSettings fields read from a nested config key (``window.length`` ...).
NESTED_KEYS = {
    "window_length": ("window", "length"),
    "window_overlap": ("window", "overlap"),
    "anchors": ("cross_frame", "anchors"),
    "warp": ("prev_frame", "warp"),
    "canvas": ("multi_frame", "canvas"),
}


def _plain(value):
    """A config list (OmegaConf's ListConfig, a list) as a tuple; anything else as it is."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def settings_from_config(config: Mapping, **overrides) -> EditSettings:
    """The :class:`EditSettings` of an ``infer.py`` / ``eval.py`` config: its keys named as the
    fields, the nested keys of ``NESTED_KEYS`` (``window.length``, ``cross_frame.anchors``
    ...), then ``overrides``; absent keys keep the defaults."""
    values = {f.name: config[f.name] for f in fields(EditSettings) if f.name in config}
    for name, (group, key) in NESTED_KEYS.items():
        if key in (config.get(group) or {}):
            values[name] = config[group][key]
    values = {k: _plain(v) for k, v in {**values, **overrides}.items()}
    return EditSettings(**values)


def temporal_frame_limit(unet: torch.nn.Module) -> int | None:
    """The most frames the UNet's temporal attention takes (its position table), if it has any."""
    limits = [m.max_frames for m in unet.modules() if isinstance(m, TemporalAttention)]
    return min(limits) if limits else None


def check_settings(settings: EditSettings, max_frames: int | None = None) -> None:
    """Raise ValueError naming the first setting that is of the wrong type or out of range."""
    for name in ("steps", "t_s", "window_length", "window_overlap", "chunk_size"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    for name in ("w", "w_t", "strength", "noise_correlation", "eta"):
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if settings.method is not None:
        get_method(settings.method).check(settings, None, False)
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    if settings.t_s < 0:
        raise ValueError(f"t_s must be >= 0, got {settings.t_s}")
    if settings.w < 0:
        raise ValueError(f"w (content guidance) must be >= 0, got {settings.w}")
    if settings.w_t < 0:
        raise ValueError(
            f"w_t (temporal guidance) must be >= 0, got {settings.w_t}: 0 is the image model "
            "frame by frame, 1 the video model, more smooths further"
        )
    if settings.eta is not None and settings.eta < 0:
        raise ValueError(f"eta must be >= 0, got {settings.eta}")
    if not 0.0 <= settings.strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {settings.strength}")
    if not 0.0 <= settings.noise_correlation <= 1.0:
        raise ValueError(f"noise_correlation must be in [0, 1], got {settings.noise_correlation}")
    if settings.prepack not in ("auto", True, False):
        raise ValueError(f"prepack must be auto, true or false, got {settings.prepack!r}")
    if settings.source_latents not in ("mean", "sample"):
        raise ValueError(f"source_latents must be mean or sample, got {settings.source_latents!r}")
    if settings.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {settings.chunk_size}")
    window_slices(1, settings.window_length, settings.window_overlap)
    if max_frames is not None and settings.window_length > max_frames:
        raise ValueError(
            f"window length {settings.window_length} exceeds the {max_frames} frames the "
            "model's temporal attention takes (unet.temporal_max_frames)"
        )
    sampler, _ = resolve_sampler(settings.sampler, settings.schedule)
    sampler_kwargs(sampler, settings.eta, None)  # eta only for the stochastic samplers
