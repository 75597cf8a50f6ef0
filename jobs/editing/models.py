"""The model an edit runs, and its content embedding: the checkpoint's Gen1 with the MiDaS to
use, cast to the working precision; the reference image, frame or prompt as CLIP content."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from data.media import (
    read_frames,
)
from jobs.editing.inputs import Inputs
from jobs.editing.request import InferError, edit_settings
from model.editing.content import image_content, text_content
from model.editing.precision import autocast, cast_for_inference
from model.editing.settings import (
    check_settings,
    temporal_frame_limit,
)
from model.encoders.prior import load_prior, prior_function
from model.training.gen1 import build_depth
from model.training.loading import load_gen1
from model.weights.checkpoint import CheckpointError


def load_model(cfg: DictConfig, inputs: Inputs, device, dtype):
    """The Gen1 of ``cfg.checkpoint`` and the MiDaS to use (None: the model's or given depth),
    on ``device``, weights cast to ``dtype`` (None keeps float32)."""
    gen1 = load_gen1(cfg.checkpoint, use_ema=cfg.use_ema).to(device)
    estimator = build_depth(OmegaConf.to_container(cfg.midas)) if cfg.midas.name else None
    no_depth = inputs.depth is None and estimator is None and gen1.depth is None
    if gen1.structure_channels and no_depth:
        raise InferError(
            f"{cfg.checkpoint} has no depth model: give depth=FILE (a depth video or "
            ".npy) or midas.name=NAME midas.weights=FILE"
        )
    estimator = estimator.to(device) if estimator is not None else None
    if dtype is not None:
        for module in (gen1, estimator):
            if module is not None:
                cast_for_inference(module, dtype)
    try:
        check_settings(edit_settings(cfg), temporal_frame_limit(gen1.unet))
    except ValueError as err:
        raise InferError(str(err)) from err
    return gen1, estimator


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


def content_embedding(
    cfg: DictConfig, gen1, inputs: Inputs, device, dtype, seed: int = 0
) -> torch.Tensor:
    """Content ``(1, 1, D)`` of the reference image, the reference frame or the prompt."""
    with autocast(device, dtype):
        if inputs.reference is not None:
            image = torch.from_numpy(inputs.reference.copy()).permute(2, 0, 1)
            return image_content(gen1, image[None].float() / 127.5 - 1)
        if cfg.reference_frame is not None:
            frame = read_frames(inputs.source, [cfg.reference_frame], inputs.geometry.output)
            return image_content(gen1, frame[0])
        prior = None
        if cfg.prompt_mode == "prior":
            prior = prompt_prior(cfg, gen1.clip.embed_dim, device, seed)
        return text_content(gen1, cfg.prompt, cfg.prompt_mode, prior=prior)
