"""The model an edit runs, and its content: a Gen-1 checkpoint's Gen1 (content: the CLIP
embedding of a reference image, a frame, or a prompt through the prior) or an SD checkpoint's
StableDiffusion (content: the prompt and negative prompt through its own text encoder), with
the MiDaS to use, cast to the working precision, its editing method checked."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from data.media import (
    read_frames,
)
from jobs.editing.inputs import Inputs
from jobs.editing.request import InferError, edit_settings
from model.editing.content import image_content, text_content
from model.editing.methods import resolve_method
from model.editing.precision import autocast, cast_for_inference
from model.editing.settings import (
    check_settings,
    temporal_frame_limit,
)
from model.encoders.frozen import build_depth
from model.encoders.prior import load_prior, prior_function
from model.sd.files import peek
from model.sd.loading import load_sd
from model.training.loading import load_gen1
from model.weights.checkpoint import CheckpointError


def load_model(cfg: DictConfig, inputs: Inputs, device, dtype, kind: str):
    """The model of ``cfg.checkpoint`` (a Gen1 for Gen-1 kinds, a StableDiffusion for ``sd``)
    and the MiDaS to use (None: the model's own or the given depth), on ``device``, weights
    cast to ``dtype`` (None keeps float32); the settings and the method checked against it."""
    if kind == "sd":
        model = load_sd(
            cfg.checkpoint,
            config=cfg.sd.config,
            use_ema=bool(cfg.use_ema) and has_ema_copy(cfg.checkpoint),
            parameterization=cfg.sd.parameterization,
            clip_skip=cfg.sd.clip_skip,
        )
    else:
        model = load_gen1(cfg.checkpoint, use_ema=cfg.use_ema)
    model = model.to(device)
    estimator = build_depth(OmegaConf.to_container(cfg.midas)) if cfg.midas.name else None
    if model.uses_depth and inputs.depth is None and estimator is None and model.depth is None:
        raise InferError(
            f"{cfg.checkpoint} has no depth model: give depth=FILE (a depth video or "
            ".npy) or midas.name=NAME midas.weights=FILE"
        )
    estimator = estimator.to(device) if estimator is not None else None
    if dtype is not None:
        for module in (model, estimator):
            if module is not None:
                cast_for_inference(module, dtype)
    try:
        settings = edit_settings(cfg)
        check_settings(settings, temporal_frame_limit(model.sampling_unet()))
        method = resolve_method(model, settings.method)
        method.check(settings, len(inputs.indices), inputs.mask is not None)
    except ValueError as err:
        raise InferError(str(err)) from err
    return model, estimator


def has_ema_copy(path: str) -> bool:
    """Whether an SD file holds LDM's EMA weights (``model_ema.*``; ``-emaonly`` files do not)."""
    return any(key.startswith("model_ema.") for key in peek(path).shapes)


def prompt_prior(cfg: DictConfig, embed_dim: int, device, seed: int):
    """The callable ``text_content`` takes: the prior of ``cfg.prior``, sampled from ``seed``
    (two candidates, the one nearer the text kept, as DALL-E 2 does)."""
    try:
        prior = load_prior(cfg.prior)
    except CheckpointError as err:
        raise InferError(str(err)) from err
    if prior.embed_dim != embed_dim:
        raise InferError(
            f"prior={cfg.prior} maps {prior.embed_dim}-d CLIP embeddings, but the model's "
            f"CLIP has {embed_dim}: the prior belongs to another CLIP"
        )
    return prior_function(prior.to(device), seed=seed, num_candidates=2)


def content_embedding(cfg: DictConfig, model, inputs: Inputs, device, dtype, kind: str, seed=0):
    """The content of the edit: for an SD checkpoint its ``PromptEmbedding`` of ``prompt`` and
    ``negative_prompt``; for Gen-1 the CLIP content ``(1, 1, D)`` of the reference image, the
    reference frame or the prompt."""
    with autocast(device, dtype):
        if kind == "sd":
            return model.encode_prompt(cfg.prompt, cfg.negative_prompt)
        if inputs.reference is not None:
            image = torch.from_numpy(inputs.reference.copy()).permute(2, 0, 1)
            return image_content(model, image[None].float() / 127.5 - 1)
        if cfg.reference_frame is not None:
            frame = read_frames(inputs.source, [cfg.reference_frame], inputs.geometry.output)
            return image_content(model, frame[0])
        prior = None
        if cfg.prompt_mode == "prior":
            prior = prompt_prior(cfg, model.clip.embed_dim, device, seed)
        return text_content(model, cfg.prompt, cfg.prompt_mode, prior=prior)
