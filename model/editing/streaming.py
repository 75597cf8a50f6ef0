"""What the streaming edits share (``model.editing.long``: window after window;
``model.editing.fifo``: a queue at staggered noise levels): where each frame's inputs are
read, what the sink is given, what an edit reports, the noise every frame shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FrameReader = Callable[[list[int]], torch.Tensor]  # frame indices -> (B, n, C, H, W)


@dataclass(frozen=True)
class LongWindow:
    """Frames a streaming edit works on or hands on, as frame indices of the video:
    ``anchors`` (carried from the first window), ``overlap`` (carried from the previous
    window), ``new`` (made here; for the sink, the frames it is given)."""

    anchors: tuple[int, ...]
    overlap: tuple[int, ...]
    new: tuple[int, ...]

    @property
    def frames(self) -> list[int]:
        """Every frame the window holds, in the order the model sees them."""
        return [*self.anchors, *self.overlap, *self.new]

    @property
    def carried(self) -> int:
        """How many of its frames are made already."""
        return len(self.anchors) + len(self.overlap)


Sink = Callable[[LongWindow, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


@dataclass(frozen=True)
class FrameSource:
    """Where a streaming edit reads the inputs of the frames it is about to make, by frame
    indices: ``read_frames`` the input ``(B, n, 3, H, W)`` in [-1, 1]; ``read_depth`` /
    ``read_mask`` their depth ``(B, n, 1, H, W)`` and mask (optional; None: MiDaS, no
    mask); ``content_of`` / ``control_of`` their content and ControlNet units (None:
    ``content`` for all, no ControlNet); ``schedule_of`` their settings per frame
    (keyframes: ``edit_video``'s ``schedule``)."""

    read_frames: FrameReader
    content: object
    read_depth: FrameReader | None = None
    read_mask: FrameReader | None = None
    content_of: Callable[[list[int]], object] | None = None
    control_of: Callable[[list[int]], object] | None = None
    schedule_of: Callable[[list[int]], dict] | None = None

    def content_for(self, indices: list[int]):
        """The content of frames ``indices``."""
        return self.content_of(indices) if self.content_of is not None else self.content


@dataclass
class LongEditResult:
    """What a streaming edit did (its frames went to the sink): ``plan`` its windows,
    ``windows`` the ``[start, stop)`` of the frames each made, as ``EditResult.windows``;
    a fifo edit has none, and ``queue`` instead."""

    plan: list[LongWindow] = field(default_factory=list)
    windows: list[tuple[int, int]] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)
    steps_run: int = 0
    method: str = ""
    method_settings: dict = field(default_factory=dict)
    window_calls: int = 0
    # a fifo edit's queue (``model.editing.fifo``): frames_per_level, levels, calls, frames
    queue: dict = field(default_factory=dict)


def shared_noise(model, video_shape: torch.Size, generator) -> torch.Tensor:
    """One draw ``(B, 1, C, h, w)`` of the latents' shape: the part of the starting noise the
    frames of every window share (so windows do not restart the noise of a method that
    shares it: Gen-1's PYoCo correlation, mov2mov's one draw)."""
    batch, _, _, height, width = video_shape
    factor = model.vae.downsample_factor
    channels = model.sampling_unet().out_channels
    shape = (batch, 1, channels, height // factor, width // factor)
    return torch.randn(shape, generator=generator)
