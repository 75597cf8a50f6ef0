"""Cross-frame attention: every frame's spatial self-attention takes its keys and values from
a set of anchor frames, with no training (Text2Video-Zero, Khachatryan et al. 2023: the first
frame; Tune-A-Video's sparse-causal attention, Wu et al. 2023, and Rerender-A-Video, Yang et
al. 2023: the first and the previous frame; or a few keyframes).

The UNet takes the anchors explicitly (``UNet.forward(anchors=...)``, ``model.nets.frames``);
the denoiser here passes them and runs the frames in windows of ``window_length`` (no overlap:
frames meet only through their anchors) with every anchor frame a window refers to carried
into it, ahead of the window's own frames, at the current step's latents. With anchors
``first`` or ``keyframes`` a frame's output is then the same whatever the windows (nothing
drifts over a long video); with ``first_previous`` a carried previous frame attends to the
first frame and itself. Noise, guidance and conditioning are mov2mov's.
"""

from __future__ import annotations

from typing import Any

import torch

from model.diffusion.guidance import ClassifierFreeGuidance
from model.diffusion.windows import slice_frames, window_slices
from model.editing.methods.base import model_denoiser
from model.editing.methods.mov2mov import Mov2Mov

ANCHOR_MODES = ("first", "first_previous", "self")


def anchor_table(anchors: str | list[int] | tuple[int, ...], num_frames: int) -> torch.Tensor:
    """The anchor frames of every frame, a long tensor ``(num_frames, A)``: ``first`` [0];
    ``first_previous`` [0, k - 1] (frame 0: [0, 0]); ``self`` [k] (plain self-attention, the
    control); a list of keyframe indices: those for every frame. ``ValueError`` otherwise."""
    frames = torch.arange(num_frames)
    if isinstance(anchors, str):
        if anchors == "first":
            return torch.zeros(num_frames, 1, dtype=torch.long)
        if anchors == "first_previous":
            return torch.stack([torch.zeros_like(frames), (frames - 1).clamp_min(0)], dim=1)
        if anchors == "self":
            return frames[:, None]
        raise ValueError(
            f"cross_frame.anchors must be one of {', '.join(ANCHOR_MODES)} or a list of "
            f"keyframe indices, got {anchors!r}"
        )
    keys = check_keyframes(anchors, num_frames)
    return torch.tensor(keys, dtype=torch.long)[None].expand(num_frames, -1).contiguous()


def check_keyframes(anchors, num_frames: int | None) -> list[int]:
    """Keyframe indices as ints, each in ``[0, num_frames)`` (None: only ``>= 0``);
    ``ValueError`` for an empty list or an index outside."""
    if isinstance(anchors, str) or not all(isinstance(k, int) for k in anchors):
        raise ValueError(f"cross_frame.anchors: keyframes must be integers, got {anchors!r}")
    keys = [int(k) for k in anchors]
    if not keys:
        raise ValueError("cross_frame.anchors: the keyframe list is empty")
    limit = num_frames if num_frames is not None else float("inf")
    outside = [k for k in keys if not 0 <= k < limit]
    if outside:
        where = f"the edit's {num_frames} frames" if num_frames is not None else "frames"
        raise ValueError(f"cross_frame.anchors: keyframes {outside} are outside {where}")
    return keys


class AnchoredUNet:
    """Stands in for a UNet in ``model.model_fn``: calls it with ``anchors`` ``(F, A)``."""

    def __init__(self, unet: torch.nn.Module, anchors: torch.Tensor) -> None:
        self.unet, self.anchors = unet, anchors

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context=None, **kwargs) -> torch.Tensor:
        return self.unet(x, t, context, anchors=self.anchors, **kwargs)


def window_plan(table: torch.Tensor, window: slice) -> tuple[list[int], torch.Tensor, int]:
    """The frames one window runs: the anchor frames it refers to outside itself, then its own;
    their anchors as positions in that list (a carried frame's anchor that is not in the
    list: itself); and how many frames were carried ahead of the window's."""
    own = list(range(window.start, window.stop))
    carried = sorted(set(table[own].flatten().tolist()) - set(own))
    order = carried + own
    where = {frame: i for i, frame in enumerate(order)}
    local = [[where.get(a, where[f]) for a in table[f].tolist()] for f in order]
    return order, torch.tensor(local, dtype=torch.long), len(carried)


class CrossFrameDenoiser:
    """Classifier-free guidance ``w`` of ``model``'s image UNet with cross-frame attention to
    ``anchors`` (``anchor_table``), in windows of ``length`` frames with the anchor frames
    carried in. Called as ``d(x, sigma, cond=..., uncond=...)`` on ``(B, F, C, h, w)``."""

    overlap = 0

    def __init__(self, model: Any, w: float, anchors, length: int) -> None:
        self.model, self.w, self.anchors, self.length = model, w, anchors, length
        self.windows_seen = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        table = anchor_table(self.anchors, x.shape[1])
        unet = self.model.sampling_unet()
        out = torch.empty_like(x)
        for window in window_slices(x.shape[1], self.length, 0):
            order, local, carried = window_plan(table, window)
            index = torch.tensor(order, device=x.device)
            guided = ClassifierFreeGuidance(
                model_denoiser(self.model, AnchoredUNet(unet, local.to(x.device))), self.w
            )
            part = sigma[:, index] if torch.as_tensor(sigma).ndim == 2 else sigma  # per frame
            pred = guided(x[:, index], part, **slice_frames(kwargs, index, x.shape))
            out[:, window] = pred[:, carried:]
            self.windows_seen += 1
        return out


class CrossFrame(Mov2Mov):
    """``method=cross_frame``: mov2mov whose frames attend to anchor frames
    (``settings.anchors``)."""

    name = "cross_frame"
    needs = "an image model (any SD checkpoint, or a Gen-1 UNet with its temporal layers off)"
    roles = frozenset({"denoiser"})

    def denoiser(self, model: Any, settings: Any, progress: bool = False) -> CrossFrameDenoiser:
        return CrossFrameDenoiser(model, settings.w, settings.anchors, settings.window_length)

    def check(self, settings: Any, num_frames: int | None, masked: bool) -> None:
        """Anchors that name a mode, or keyframes inside the edit (``num_frames`` None: not
        known yet)."""
        if isinstance(settings.anchors, str):
            anchor_table(settings.anchors, 1)
        else:
            check_keyframes(settings.anchors, num_frames)

    def describe(self, settings: Any) -> dict:
        anchors = settings.anchors
        return {"anchors": anchors if isinstance(anchors, str) else [int(a) for a in anchors]}
