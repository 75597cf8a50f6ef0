"""Edits of any length without window seams: FIFO-Diffusion's diagonal denoising (Kim et
al. 2024, "FIFO-Diffusion: Generating Infinite Videos from Text without Training").

A sequential edit (``model.editing.long``) makes a video a window at a time, and where two
windows meet, frames made apart meet: a seam. Here no frame is made apart from its
neighbours. The frames wait in a queue at staggered noise levels, the oldest nearly clean and
the newest just started; every iteration the UNet takes the whole queue one step down, each
frame at its own noise level (a sigma per frame: ``model.diffusion.schedule.batch_sigma``),
the oldest frames leave clean (decoded and handed on at once) and new ones join at the run's
first level. Every frame goes through the same steps beside the frames before and after it,
so nothing marks where one call of the UNet ends and the next begins; memory holds the queue,
never the video. ``per_level`` frames share each level (FIFO-Diffusion's diagonal is one;
by default a third of a call, so that a call spans about three levels: the tiny world
model, trained on clips at one noise level, follows a whole window of levels poorly,
README), so the queue holds ``per_level`` x steps frames and runs in parts of at most
``window_length`` frames (FIFO's latent partitioning). Every frame still takes the run's
steps once: a frame costs ``steps`` frame evaluations whatever ``per_level``.

Anchor frames (``window.anchors``: frames made first, as in a sequential edit) join every
call as made frames, noised to the level of the call's most advanced frame, so that colours
and the subject cannot creep over minutes. The sampler steps each frame on its own: Euler,
DDIM (eta 0) and DPM++ 2M (its history kept per frame) have such a step; other samplers are
refused. Methods that render frame after frame (``prev_frame``, ``multi_frame``) have no
windows to join and are refused too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from model.diffusion.samplers import resolve_sampler
from model.editing.fifo_queue import STEPS, FifoQueue
from model.editing.methods import SEQUENTIAL, resolve_method
from model.editing.precision import inference_weights
from model.editing.settings import EditSettings, check_settings, temporal_frame_limit
from model.editing.streaming import FrameSource, LongEditResult, Sink


def check_fifo_settings(settings: EditSettings) -> None:
    """``ValueError`` (one line) for a sampler that cannot step a frame on its own, or a
    ``settings.method`` that renders frame after frame (the model's default is checked by
    ``check_fifo``)."""
    names = str(settings.method or "").split("+")
    if SEQUENTIAL & {n.strip() for n in names}:
        raise ValueError(
            f"window.mode=fifo: method {settings.method} renders frame after frame already "
            "(no windows to join); use window.mode=sequential or blend"
        )
    sampler, _ = resolve_sampler(settings.sampler, settings.schedule)
    kind = STEPS.get(sampler)
    if kind == "ddim" and settings.eta:
        raise ValueError(
            f"window.mode=fifo steps every frame on its own: DDIM does so only at eta 0, "
            f"got eta={settings.eta}"
        )
    if kind is None:
        raise ValueError(
            f"window.mode=fifo steps every frame on its own: sampler {settings.sampler!r} "
            "has no such step; use euler, ddim (eta 0) or dpmpp_2m"
        )


def check_fifo(model, settings: EditSettings) -> None:
    """``check_fifo_settings`` with the method ``model`` resolves ``settings.method`` to."""
    method = resolve_method(model, settings.method)
    check_fifo_settings(replace(settings, method=method.name))


def fifo_room(length: int, anchors: Sequence[int], num_frames: int | None = None) -> int:
    """The frames of the queue one UNet call of ``length`` frames holds beside ``anchors``
    (frames of the first window, ``[0, length)``, and of the video's ``num_frames`` when
    known); ``ValueError`` (one line) when an anchor is outside or no frame fits."""
    anchors = sorted({int(a) for a in anchors})
    first = length if num_frames is None else min(length, num_frames)
    outside = [a for a in anchors if not 0 <= a < first]
    if outside:
        raise ValueError(
            f"window.mode=fifo: anchors {outside} are not frames of the first window [0, {first})"
        )
    if length - len(anchors) < 1:
        raise ValueError(
            f"window.mode=fifo: a call of {length} frames leaves no room beside "
            f"{len(anchors)} anchor(s)"
        )
    return length - len(anchors)


def frames_per_level(room: int, per_level: int | None = None) -> int:
    """Frames that share each noise level of the queue: ``per_level``, or by default a third
    of a call's ``room`` rounded up, so that one UNet call spans about three levels (one
    frame per level, FIFO-Diffusion's own diagonal, spans a whole window of levels: frames
    far apart in noise beside each other, which the tiny world model follows poorly, README);
    ``ValueError`` unless a whole number >= 1."""
    if per_level is None:
        return max(1, -(-room // 3))
    if isinstance(per_level, bool) or not isinstance(per_level, int) or per_level < 1:
        raise ValueError(f"window.frames_per_level must be a whole number >= 1, got {per_level!r}")
    return per_level


@torch.no_grad()
def edit_fifo_video(
    model,
    num_frames: int,
    source: FrameSource,
    settings: EditSettings,
    sink: Sink,
    anchors: Sequence[int] = (0,),
    *,
    depth_estimator: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    per_level: int | None = None,
) -> LongEditResult:
    """Edit a video of ``num_frames`` frames by diagonal denoising, in memory bounded by the
    queue (``edit_long_video(mode="fifo")`` calls it): ``source`` reads each frame's inputs
    (``model.editing.streaming.FrameSource``), ``sink(window, edited, source, depth)`` gets
    the frames in order as they leave the queue (``window.new`` naming them, ``edited`` and
    ``source`` ``(B, n, 3, H, W)`` in [-1, 1] on the CPU), ``anchors`` are frames of the
    first window ``[0, window_length)`` (they join every call once made; ``fifo_room``) and
    ``per_level`` the frames that share a noise level (None: ``frames_per_level``'s).

    Frames are read, conditioned and encoded a window's worth at a time (``window_length``
    minus the anchors), their noise drawn then (the shared part once for the video), so an
    edit whose video fits one such block and whose frames do not see each other (``mov2mov``)
    equals ``edit_video``. Raises ``ValueError`` before any compute for a sampler or method
    that cannot step frame by frame (``check_fifo``), anchors outside the first window, a
    bad ``per_level``, and as ``edit_video`` does for settings.
    """
    check_fifo(model, settings)
    unet = model.sampling_unet()
    check_settings(settings, temporal_frame_limit(unet))
    anchors = sorted({int(a) for a in anchors})
    room = fifo_room(settings.window_length, anchors, num_frames)
    per_level = frames_per_level(room, per_level)
    method = resolve_method(model, settings.method)
    estimator = depth_estimator if depth_estimator is not None else model.depth
    networks = [unet, model.vae, estimator if source.read_depth is None else None]
    with inference_weights(settings, autocast_dtype, *networks):
        queue = FifoQueue(
            model, method, replace(settings, prepack=False), num_frames, anchors, room, source,
            depth_estimator, generator, autocast_dtype, per_level,
        )  # fmt: skip
        return queue.run(sink, progress)
