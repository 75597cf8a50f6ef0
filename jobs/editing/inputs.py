"""Everything an edit reads from disk, read before the model is loaded: the video's frames
(upright, at the working size), their output timing, the audio of the kept span, the
reference, mask and depth files."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.transforms.functional import gaussian_blur

from data.audio import AudioTrack
from data.io import FrameTimes
from data.media import (
    SourceVideo,
    output_timing,
    probe_video,
    read_audio,
    read_depth,
    read_frames,
    read_image,
    read_mask,
)
from jobs.editing.control import check_control_request, read_hint_files
from jobs.editing.keyframes import requested_keyframes
from jobs.editing.request import (
    Geometry,
    InferError,
    check_request,
    edit_settings,
    frame_indices,
    plan_geometry,
    resolution,
)
from model.editing.settings import (
    check_settings,
)


@dataclass
class Inputs:
    """Everything read from disk before the model is loaded."""

    source: SourceVideo
    geometry: Geometry  # output size (aspect kept) and the padded working size
    indices: list[int]  # source frames used
    # (1, F, 3, H, W) in [-1, 1] at the working size; None for a sequential edit, which reads
    # a window at a time (read_window)
    reference: np.ndarray | None  # reference image (H, W, 3) uint8
    mask: torch.Tensor | None  # (1, F or 1, 1, H, W) in [0, 1], at the working size
    depth: torch.Tensor | None  # (1, F, 1, H, W), at the working size
    times: FrameTimes  # when each output frame shows
    timing: str  # "constant rate" or "source timestamps"
    audio: AudioTrack  # the kept span's audio, ready to mux (or why there is none)
    hints: dict[int, torch.Tensor]  # ControlNet hints given as files, by unit index
    frames: torch.Tensor | None = None

    def read_window(self, positions: list[int]) -> torch.Tensor:
        """Frames ``(1, n, 3, H, W)`` in [-1, 1] at the working size of the edit's frames at
        ``positions`` (0 .. F - 1), from memory or, for a sequential edit, from the file."""
        if self.frames is not None:
            return self.frames[:, positions]
        size = self.geometry.output
        return self.geometry.pad(
            read_frames(self.source, [self.indices[p] for p in positions], size)
        )


def sequential(cfg: DictConfig) -> bool:
    """Whether the edit streams frames from the input to the output in flat memory, window
    after window (``window.mode=sequential``) or through a queue (``fifo``)."""
    return cfg.window.get("mode", "blend") in ("sequential", "fifo")


def feather(mask: torch.Tensor, pixels: float) -> torch.Tensor:
    """A mask ``(1, F, 1, H, W)`` in [0, 1] with its edge softened inward over about
    ``pixels`` (a Gaussian blur of that sigma, kept inside the mask: where the mask is 0 it
    stays 0, so the unmasked region is still passed through exactly)."""
    if not pixels:
        return mask
    size = 2 * math.ceil(3 * pixels) + 1
    flat = mask.flatten(0, 1).float()
    soft = gaussian_blur(flat, [size, size], [float(pixels)] * 2).view_as(mask)
    return soft * mask.float()


def read_feathered_mask(cfg: DictConfig, source, indices: list[int], size) -> torch.Tensor | None:
    """The ``mask`` file (image or video) at the output size, feathered (None: no mask)."""
    if not cfg.mask:
        return None
    return feather(read_mask(cfg.mask, source, indices, size), cfg.mask_feather)


def pad(geometry: Geometry, video: torch.Tensor | None) -> torch.Tensor | None:
    """A mask or depth video at the output size, padded to the working size (None passes)."""
    return None if video is None else geometry.pad(video)


def read_inputs(cfg: DictConfig, kind: str) -> Inputs:
    """Check the request and read every input file; any problem is an InferError."""
    check_request(cfg, kind)
    requested_keyframes(cfg, kind)  # their keys and files, before any frame is decoded
    check_control_request(cfg, kind)
    try:
        check_settings(edit_settings(cfg))
    except ValueError as err:
        raise InferError(str(err)) from err
    source = probe_video(cfg.input)
    geometry = plan_geometry(source.height, source.width, resolution(cfg, kind), cfg.size_multiple)
    size = geometry.output
    indices = frame_indices(source, cfg.start, cfg.end, cfg.stride, cfg.max_frames)
    times, span_s, timing = output_timing(source, indices, cfg.stride)
    if cfg.reference_frame is not None and not 0 <= cfg.reference_frame < source.num_frames:
        raise InferError(
            f"reference_frame={cfg.reference_frame} is outside the input's "
            f"{source.num_frames} frames"
        )
    if sequential(cfg):  # frames are read a window at a time: a broken stream is found now
        read_frames(source, [indices[0], indices[-1]], size)
    return Inputs(
        source=source,
        geometry=geometry,
        indices=indices,
        frames=None if sequential(cfg) else geometry.pad(read_frames(source, indices, size)),
        reference=read_image(cfg.reference) if cfg.reference is not None else None,
        mask=pad(geometry, read_feathered_mask(cfg, source, indices, size)),
        depth=pad(geometry, read_depth(cfg.depth, source, indices, size) if cfg.depth else None),
        times=times,
        timing=timing,
        audio=read_audio(source, span_s),  # cut and encoded now: writing cannot fail on it
        hints=read_hint_files(cfg, source, indices, size, geometry),
    )
