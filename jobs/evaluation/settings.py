"""eval.py's config: its checks (before anything is loaded), the edit settings it implies,
and the model and depth estimator it loads."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from model.editing.methods import get_method
from model.editing.settings import (
    EditSettings,
    check_settings,
    settings_from_config,
    temporal_frame_limit,
)
from model.encoders.frozen import build_depth
from model.training.loading import load_gen1

SEED_STRIDE = 1000  # clip i's noise seeds: seed + 1000 i (+ frame k frame by frame)


class EvalError(Exception):
    """A bad setting or input, reported to the user as one line."""


def check_config(cfg: DictConfig) -> None:
    """Every choice and count in range, before anything is loaded."""
    choices = {
        "mode": ("compare", "sweep", "prompts", "methods", "long"),
        "reference": ("other_clip", "own_clip"),
        "content": ("image", "prompt"),
        "structure": ("auto", "midas", "exact"),
        "fidelity_reference": ("midas", "exact"),
    }
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise EvalError(f"{key} must be one of {', '.join(allowed)}; got {cfg[key]!r}")
    if cfg.num_clips < 1:
        raise EvalError(f"num_clips must be >= 1, got {cfg.num_clips}")
    if not 2 <= cfg.num_frames < SEED_STRIDE:
        raise EvalError(f"num_frames must be in [2, {SEED_STRIDE}), got {cfg.num_frames}")
    if not 0 <= cfg.reference_frame < cfg.num_frames:
        raise EvalError(f"reference_frame must be in [0, num_frames), got {cfg.reference_frame}")
    if (cfg.content == "prompt" or cfg.mode == "prompts") and not cfg.prompt:
        raise EvalError("content=prompt needs prompt=TEXT (or prompt=caption)")
    if cfg.mode == "methods":
        check_methods(cfg)
    if cfg.mode in ("prompts", "methods") and not Path(str(cfg.prior)).is_file():
        raise EvalError(
            f"mode={cfg.mode} needs prior=FILE (a prior file: release.py --component prior); "
            f"not found: {cfg.prior}"
        )
    if cfg.mode == "sweep" and not (cfg.sweep.w_t and cfg.sweep.t_s):
        raise EvalError("sweep.w_t and sweep.t_s must each list at least one value")
    try:
        for w_t, t_s in [(cfg.w_t, cfg.t_s), *((w, cfg.t_s) for w in cfg.sweep.w_t)]:
            check_settings(edit_settings(cfg, w_t, t_s))
        for t_s in cfg.sweep.t_s:
            check_settings(edit_settings(cfg, cfg.w_t, t_s))
    except ValueError as err:
        raise EvalError(str(err)) from err


def check_methods(cfg: DictConfig) -> None:
    """``mode=methods``: the SD file, the ControlNet (its file and scale), the methods of
    each, the speeds and the settings they take."""
    if not Path(str(cfg.methods.sd_checkpoint)).is_file():
        raise EvalError(f"methods.sd_checkpoint not found: {cfg.methods.sd_checkpoint}")
    if cfg.methods.num_clips < 1:
        raise EvalError(f"methods.num_clips must be >= 1, got {cfg.methods.num_clips}")
    if not cfg.methods.speeds or any(s <= 0 for s in cfg.methods.speeds):
        raise EvalError(f"methods.speeds must list positive speeds, got {cfg.methods.speeds}")
    unit = cfg.methods.controlnet
    lists = {"methods.image": cfg.methods.image}
    if unit.file:
        if not Path(str(unit.file)).is_file():
            raise EvalError(f"methods.controlnet.file not found: {unit.file}")
        if float(unit.scale) < 0:
            raise EvalError(f"methods.controlnet.scale must be >= 0, got {unit.scale}")
        lists["methods.controlnet.image"] = unit.image
    run = {"strength": cfg.methods.strength, "steps": cfg.methods.steps}
    for key, methods in lists.items():
        for method in methods:
            if "gen1" in str(method).split("+"):
                raise EvalError(f"{key} lists image-model methods; gen1 runs on its own")
            try:
                settings = edit_settings(cfg, cfg.w_t, cfg.t_s, method=method, **run)
                check_settings(settings)
                get_method(method).check(settings, cfg.num_frames, False)
            except ValueError as err:
                raise EvalError(f"{key}: {err}") from err


def edit_settings(cfg: DictConfig, w_t: float, t_s: int, **overrides) -> EditSettings:
    """The sampling settings of the config at temporal guidance ``w_t`` and fidelity ``t_s``
    (an unresolved ``noise_correlation`` as 0)."""
    base = {"noise_correlation": cfg.noise_correlation or 0.0}
    return settings_from_config(cfg, **{**base, "w_t": float(w_t), "t_s": int(t_s), **overrides})


def load_model(cfg: DictConfig, device: torch.device):
    """The Gen1 of ``cfg.checkpoint`` and the MiDaS that scores structure (``cfg.midas`` or
    the model's own), both on ``device``."""
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise EvalError(
            f"checkpoint not found: {path} (train and release the tiny-world model, or give "
            "checkpoint=FILE: a release .safetensors or a Lightning .ckpt)"
        )
    gen1 = load_gen1(path, use_ema=cfg.use_ema).to(device)
    midas = OmegaConf.to_container(cfg.midas)
    estimator = build_depth(midas) if midas.get("name") else gen1.depth
    if estimator is None:
        raise EvalError(
            f"{path} has no depth model, and structure fidelity needs one: give "
            "midas.name=NAME midas.weights=FILE"
        )
    try:
        check_settings(edit_settings(cfg, cfg.w_t, cfg.t_s), temporal_frame_limit(gen1.unet))
    except ValueError as err:
        raise EvalError(str(err)) from err
    return gen1, estimator.to(device)


def device_of(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device={cfg.device}: no CUDA device is available")
    return device
