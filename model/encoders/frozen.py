"""The frozen encoders of an edit or a training run, built from their config: MiDaS
(``DepthEstimator``) and the CLIP embedder, loaded from their weight files, or random
stand-ins (tests, tiny runs) drawn from a fixed seed so that every run has the same."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from model.encoders.clip import build_clip, load_clip
from model.encoders.depth import DepthEstimator, build_midas, load_midas

log = logging.getLogger(__name__)


def _params(cfg: dict) -> dict:
    """A config dict without Hydra's ``_target_``."""
    return {k: v for k, v in dict(cfg).items() if k != "_target_"}


def build_depth(cfg: dict | None) -> DepthEstimator | None:
    """MiDaS from ``{name, weights, chunk_size, ...overrides}``; None uses the batch's depth."""
    if cfg is None:
        return None
    cfg = _params(cfg)
    name, weights = cfg.pop("name"), cfg.pop("weights", None)
    chunk_size = cfg.pop("chunk_size", 8)
    if weights:
        net = load_midas(weights, name, config_key="model.depth.weights", **cfg)
    else:
        log.warning("model.depth.weights is not set: MiDaS %s has random weights", name)
        with seeded_stand_in():
            net = build_midas(name, **cfg)
    return DepthEstimator(net, chunk_size=chunk_size)


def build_content_encoder(cfg: dict):
    """The frozen CLIP image/text embedder from ``{model, weights}``."""
    cfg = _params(cfg)
    if cfg.get("weights"):
        return load_clip(cfg["weights"], cfg["model"], config_key="model.clip.weights")
    log.warning("model.clip.weights is not set: CLIP %s has random weights", cfg["model"])
    with seeded_stand_in():
        return build_clip(cfg["model"])


@contextmanager
def seeded_stand_in(seed: int = 0):
    """Random stand-in weights (an encoder without its weight file) drawn from ``seed``, so
    that every run, and every process of a job, has the same; the global generator is left
    as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
