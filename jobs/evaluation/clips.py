"""Held-out clips of the procedural world with their exact geometry (depth, flow, visibility)
and the reference each edit takes its content from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from data.synthetic import SyntheticWorldDataset
from data.world_render import render
from model.metrics.video import (
    flow_valid_mask,
)


@dataclass
class WorldClip:
    """A held-out clip with its exact geometry and the reference that sets its content."""

    index: int
    key: str
    caption: str
    frames: torch.Tensor  # (1, F, 3, H, W) in [-1, 1]
    depth: torch.Tensor  # (1, F, 1, H, W) exact inverse depth
    flow: torch.Tensor  # (F - 1, 2, H, W) forward flow in pixels
    valid: torch.Tensor  # (F - 1, H, W) pixels where the flow is exact and unoccluded
    reference_key: str
    reference_image: torch.Tensor  # (1, 3, H, W) the content image
    reference_caption: str


def _render(world: SyntheticWorldDataset, index: int):
    scene = world.scene(index)
    clip = render(scene, world.num_frames, world.size)
    seen = [k - 1 for k in clip.surface.unique().tolist() if k > 0]
    height, width = world.size
    key = f"world#{world.scene_seed(index)}#{world.num_frames}x{height}x{width}"  # as the dataset
    return clip, scene.caption(seen), key


def world_clips(cfg: DictConfig) -> Iterator[WorldClip]:
    """Clips ``0 .. num_clips - 1`` of the test split; other-clip references are clips
    ``num_clips + i`` (held out too, never edited)."""
    world = SyntheticWorldDataset(
        num_clips=2 * cfg.num_clips,
        num_frames=cfg.num_frames,
        size=cfg.size,
        seed=cfg.world_seed,
        split="test",
        speed=cfg.speed,
    )
    for i in range(cfg.num_clips):
        clip, caption, key = _render(world, i)
        ref, ref_caption, ref_key = clip, caption, key
        if cfg.reference == "other_clip":
            ref, ref_caption, ref_key = _render(world, cfg.num_clips + i)
        yield WorldClip(
            index=i,
            key=key,
            caption=caption,
            frames=clip.frames[None],
            depth=clip.inverse_depth[None],
            flow=clip.flow,
            valid=flow_valid_mask(clip.flow, clip.surface),
            reference_key=ref_key,
            reference_image=ref.frames[cfg.reference_frame][None],
            reference_caption=ref_caption,
        )


def prompt_of(cfg: DictConfig, clip: WorldClip) -> str | None:
    """The prompt of ``clip``: the configured text, or its reference's caption."""
    return clip.reference_caption if cfg.prompt == "caption" else cfg.prompt
