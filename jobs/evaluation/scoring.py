"""Editing one held-out clip in each setting compared, and scoring an output with every metric."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from jobs.evaluation.clips import WorldClip, prompt_of
from jobs.evaluation.settings import SEED_STRIDE, edit_settings
from model.editing.content import image_content, text_content
from model.editing.pipeline import edit_video, video_depth
from model.metrics.video import (
    frame_consistency,
    prompt_consistency,
    sharpness,
    structure_fidelity,
    warp_error,
)


class Editor:
    """Edits one clip with fixed content, conditioning depth and noise seeds."""

    def __init__(
        self, cfg: DictConfig, gen1, estimator, clip: WorldClip, content: torch.Tensor | None = None
    ) -> None:
        self.cfg, self.gen1, self.clip = cfg, gen1, clip
        self.midas_depth = video_depth(gen1, clip.frames, estimator, cfg.chunk_size)
        structure = cfg.structure
        if structure == "auto":
            structure = "midas" if gen1.depth is not None or cfg.midas.name else "exact"
        self.depth = clip.depth if structure == "exact" else self.midas_depth
        if content is not None:
            self.content = content
        elif cfg.content == "image":
            self.content = image_content(gen1, clip.reference_image)
        else:
            self.content = text_content(gen1, prompt_of(cfg, clip), mode="direct")
        self.seed = cfg.seed + SEED_STRIDE * clip.index

    def _edit(self, frames, depth, settings, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        result = edit_video(
            self.gen1, frames, self.content, settings, depth=depth, generator=generator
        )
        return result.frames[0]

    def video(self, w_t: float, t_s: int, noise_correlation: float | None = None) -> torch.Tensor:
        """The whole clip through the video model in one sampling run; its frames' noise
        correlates by ``noise_correlation`` (None: the config's; 1: one noise for all)."""
        extra = {} if noise_correlation is None else {"noise_correlation": noise_correlation}
        settings = edit_settings(self.cfg, w_t, t_s, **extra)
        return self._edit(self.clip.frames, self.depth, settings, self.seed)

    def frame_by_frame(self, t_s: int, shared_noise: bool) -> torch.Tensor:
        """Each frame edited alone as a 1-frame clip, so the UNet runs as the image model
        (temporal layers off, ``mu^pi``; ``w_t`` then changes nothing, and 1 costs the fewest
        passes). Its depth is normalised per frame, as an image model sees it. Frame k's noise
        seed is the clip's (``shared_noise``: the same noise for every frame) or the clip's + k.
        """
        settings = edit_settings(self.cfg, 1.0, t_s)
        frames = [
            self._edit(
                self.clip.frames[:, k : k + 1],
                self.depth[:, k : k + 1],
                settings,
                self.seed + (0 if shared_noise else k),
            )
            for k in range(self.clip.frames.shape[1])
        ]
        return torch.cat(frames)


class Scorer:
    """All metrics of one clip's outputs, against that clip's input and geometry."""

    def __init__(self, cfg: DictConfig, gen1, estimator, clip: WorldClip, midas_depth) -> None:
        self.cfg, self.gen1, self.estimator, self.clip = cfg, gen1, estimator, clip
        exact = cfg.fidelity_reference == "exact"
        self.depth_in = (clip.depth if exact else midas_depth)[0]
        self.prompt = prompt_of(cfg, clip)

    def __call__(self, frames: torch.Tensor) -> dict[str, float]:
        """Scores of output ``frames`` ``(F, 3, H, W)`` in [-1, 1]."""
        clip_net = self.gen1.clip
        depth_out = video_depth(self.gen1, frames[None], self.estimator, self.cfg.chunk_size)[0]
        scores = {
            "frame_consistency": frame_consistency(clip_net, frames),
            "warp_error": warp_error(frames, self.clip.flow, self.clip.valid),
            "structure_fidelity": structure_fidelity(self.depth_in, depth_out),
            "sharpness": sharpness(frames),
        }
        if self.prompt:
            scores["prompt_consistency"] = prompt_consistency(clip_net, frames, self.prompt)
        return scores
