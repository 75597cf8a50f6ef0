"""Long edits in flat memory: window after window, each carrying frames already made.

``edit_video`` samples all frames of a video together (its windows only bound the UNet's
calls), so its memory grows with the video. ``edit_long_video`` instead makes the video one
window at a time and hands each window's new frames to a sink as soon as they are decoded:
memory is that of one window, whatever the length. Between windows nothing is lost:

- the last ``overlap`` frames of a window are carried into the next as made frames (their
  final latents and noise; ``pipeline.Carry``), so the next window is sampled to continue
  them (the video model's temporal layers see both sides of the seam, and no latent makes a
  round trip through the VAE);
- ``anchors``, frames of the first window, are carried into every later window ahead of
  its own frames, so every window is sampled beside the same made frames (the temporal
  layers, and cross-frame attention for the image-model methods, see them): colours and
  the subject cannot creep from window to window (the drift of chained windows).

Every window holds ``settings.window_length`` frames in all: anchors, carried overlap, then
new frames. (Gen-L-Video, Wang et al. 2023, and FreeNoise, Qiu et al. 2024, blend or share
across windows at every step; this is the sequential form, as autoregressive extension.)
``mode="fifo"`` makes the video with no windows at all (``model.editing.fifo``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from model.editing.fifo import edit_fifo_video
from model.editing.pipeline import Carry, decode_latents, edit_video
from model.editing.precision import autocast, inference_weights
from model.editing.settings import EditSettings
from model.editing.streaming import (
    FrameReader,
    FrameSource,
    LongEditResult,
    LongWindow,
    Sink,
    shared_noise,
)


def long_windows(
    num_frames: int, length: int, overlap: int, anchors: Sequence[int] = (0,)
) -> list[LongWindow]:
    """The windows of a sequential edit of ``num_frames`` frames: the first makes frames
    ``[0, length)``; every later one holds the ``anchors`` (frames of the first window), the
    last ``overlap`` frames made and ``length - len(anchors) - overlap`` new frames (the last
    window fewer). ``ValueError`` when no new frame would fit, or an anchor is not in the
    first window."""
    anchors = tuple(sorted({int(a) for a in anchors}))
    if length < 1 or not 0 <= overlap < length:
        raise ValueError(f"window length {length} / overlap {overlap}: need 0 <= overlap < length")
    first = min(length, num_frames)
    outside = [a for a in anchors if not 0 <= a < first]
    if outside:
        raise ValueError(
            f"long-edit anchors {outside} are not frames of the first window [0, {first})"
        )
    step = length - overlap - len(anchors)
    if num_frames > length and step < 1:
        raise ValueError(
            f"a window of {length} frames holds {len(anchors)} anchor(s) and {overlap} "
            "overlap frame(s): no room for new frames; lengthen the window or carry fewer"
        )
    windows = [LongWindow((), (), tuple(range(first)))]
    made = first
    while made < num_frames:
        carried_overlap = [f for f in range(made - overlap, made) if f not in anchors]
        new = tuple(
            range(made, min(made + length - len(anchors) - len(carried_overlap), num_frames))
        )
        windows.append(LongWindow(anchors, tuple(carried_overlap), new))
        made = new[-1] + 1
    return windows


@torch.no_grad()
def edit_long_video(
    model,
    num_frames: int,
    read_frames: FrameReader,
    content,
    settings: EditSettings,
    sink: Sink,
    *,
    anchors: Sequence[int] = (0,),
    read_depth: FrameReader | None = None,
    read_mask: FrameReader | None = None,
    content_of: Callable[[list[int]], object] | None = None,
    control_of: Callable[[list[int]], object] | None = None,
    schedule_of: Callable[[list[int]], dict] | None = None,
    depth_estimator: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    mode: str = "sequential",
    hold: float = 0.25,
    per_level: int | None = None,
) -> LongEditResult:
    """Edit a video of ``num_frames`` frames in flat memory, window after window (``mode``
    "sequential": ``long_windows`` with ``settings.window_length`` / ``window_overlap`` and
    ``anchors``) or through a queue at staggered noise levels ("fifo":
    ``model.editing.fifo``, ``per_level`` frames sharing a level). ``read_frames(indices)``
    gives the input frames ``(B, n, 3, H, W)`` in [-1, 1] of those indices, ``read_depth`` /
    ``read_mask`` their depth ``(B, n, 1, H, W)`` and mask (optional); ``content_of(indices)``
    / ``control_of(indices)`` the content and ControlNet units for those frames (default:
    ``content`` for all, no ControlNet), and ``schedule_of(indices)`` their per-frame
    settings (keyframes; ``edit_video``'s ``schedule``).
    ``sink(window, edited, source, depth)`` receives the video's frames in order, as soon as
    they are final: ``edited`` and ``source`` ``(B, n, 3, H, W)`` in [-1, 1] on the CPU,
    ``depth`` ``(B, n, 1, H, W)`` in [-1, 1] (for previews) or None; ``window.new`` names
    the frames given (a window's seam frames, then its own but those it holds back).

    Sequential: each window is ``edit_video`` with the carried frames kept
    (``pipeline.Carry``): anchors throughout; the overlap for the first ``hold`` of the
    steps, after which it is sampled on with the window and the seam cross-faded, in
    latents, from the previous window's version to this one's (``hold=1`` keeps the overlap
    as it was made). The shared part of the noise is drawn once, every frame's own part in
    its window, from ``generator``. Raises ``ValueError`` as ``edit_video`` and
    ``long_windows`` do, for ``hold`` outside [0, 1] and an unknown ``mode``, and as
    ``edit_fifo_video`` does, before any compute.
    """
    source = FrameSource(
        read_frames, content, read_depth, read_mask, content_of, control_of, schedule_of
    )
    shared = {"depth_estimator": depth_estimator, "generator": generator,
              "autocast_dtype": autocast_dtype, "progress": progress}  # fmt: skip
    if mode == "fifo":
        return edit_fifo_video(
            model, num_frames, source, settings, sink, anchors, per_level=per_level, **shared
        )
    if mode != "sequential":
        raise ValueError(f"long-edit mode must be sequential or fifo, got {mode!r}")
    windows = long_windows(num_frames, settings.window_length, settings.window_overlap, anchors)
    if not 0.0 <= hold <= 1.0:
        raise ValueError(f"hold must be in [0, 1], got {hold}")
    result = LongEditResult(
        plan=windows,
        windows=[(w.new[0], w.new[-1] + 1) for w in windows],
        anchors=sorted({int(a) for a in anchors}),
    )
    bar = tqdm(windows, desc="long edit (windows)", disable=not progress, unit="window")
    # Weights prepacked once for the whole edit, not once per window (edit_video would).
    estimator = depth_estimator if depth_estimator is not None else model.depth
    networks = [model.sampling_unet(), model.vae, estimator if read_depth is None else None]
    with inference_weights(settings, autocast_dtype, *networks):
        return _edit_windows(
            model, windows, bar, source, replace(settings, prepack=False), sink, result,
            anchors, depth_estimator, generator, autocast_dtype, hold,
        )  # fmt: skip


def _edit_windows(
    model, windows, bar, source, settings, sink, result, anchors, depth_estimator, generator,
    autocast_dtype, hold,
) -> LongEditResult:  # fmt: skip
    """The loop of ``edit_long_video``, its arguments checked and its weights prepared."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # frame -> (latents, noise)
    pending: dict[int, torch.Tensor] = {}  # frames held back for the seam: their latents
    common = None  # the noise every window's frames share (drawn with the first window)
    for i, window in enumerate(bar):
        frames = window.frames
        carry = None
        if window.carried:
            hold_of = [hold if f in pending else 1.0 for f in frames[: window.carried]]
            carry = Carry(
                latents=_stack(made, frames, 0, window.carried),
                noise=_stack(made, frames, 1, window.carried),
                known=torch.arange(len(frames)) < window.carried,
                hold=torch.tensor(hold_of + [1.0] * len(window.new)),
            )
        pixels = source.read_frames(frames)
        mask = source.read_mask(frames) if source.read_mask is not None else None
        if common is None:
            common = shared_noise(model, pixels.shape, generator)
        edited = edit_video(
            model,
            pixels,
            source.content_for(frames),
            replace(settings, window_length=len(frames)),
            depth=source.read_depth(frames) if source.read_depth is not None else None,
            depth_estimator=depth_estimator,
            mask=mask,
            generator=generator,
            autocast_dtype=autocast_dtype,
            progress=False,
            control=source.control_of(frames) if source.control_of is not None else None,
            carry=carry,
            common=common,
            schedule=source.schedule_of(frames) if source.schedule_of is not None else None,
        )
        # The seam: frames the previous window held back, cross-faded from its latents to
        # this window's (which continued them after ``hold`` of the steps), emitted first.
        seam = [p for p, f in enumerate(frames) if f in pending]
        blended = None
        if seam:
            ramp = torch.arange(1, len(seam) + 1, dtype=torch.float32) / (len(seam) + 1)
            ramp = ramp.view(1, -1, 1, 1, 1).to(edited.latents.device)
            old = torch.stack([pending.pop(frames[p]) for p in seam], dim=1)
            blended = (1 - ramp) * old.to(edited.latents) + ramp * edited.latents[:, seam]
            for j, p in enumerate(seam):
                made[frames[p]] = (blended[:, j], made[frames[p]][1])
        coming = set(windows[i + 1].overlap) if i + 1 < len(windows) else set()
        end = window.new[-1] + 1
        keep = set(anchors) | set(range(end - settings.window_overlap, end))
        for position, frame in enumerate(frames):
            if frame in keep and frame not in made:
                made[frame] = (edited.latents[:, position], edited.noise[:, position])
            if frame in coming and frame in window.new:
                pending[frame] = edited.latents[:, position]
        for frame in [f for f in made if f not in keep]:
            del made[frame]  # only anchors and the coming overlap stay: memory stays flat
        out_positions = seam + [
            window.carried + j for j, f in enumerate(window.new) if f not in pending
        ]
        out_frames = [frames[p] for p in out_positions]
        edited_new = edited.frames[:, [j for j, f in enumerate(window.new) if f not in pending]]
        if blended is not None:
            with autocast(blended.device, autocast_dtype):
                seam_frames = decode_latents(model.vae, blended, settings.chunk_size)
            if mask is not None and settings.keep_unmasked_pixels:  # as edit_video pastes
                keep = mask.float().cpu()
                keep = keep[:, seam] if keep.shape[1] == len(frames) else keep
                seam_frames = keep * seam_frames + (1 - keep) * pixels[:, seam].float().cpu()
            edited_new = torch.cat([seam_frames, edited_new], dim=1)
        depth = edited.depth[:, out_positions] if edited.depth is not None else None
        shown = LongWindow(window.anchors, window.overlap, tuple(out_frames))
        sink(shown, edited_new, pixels[:, out_positions].float().cpu(), depth)
        result.window_calls += edited.window_calls
        result.steps_run, result.method = edited.steps_run, edited.method
        result.method_settings = edited.method_settings
    return result


def _stack(made: dict, frames: list[int], which: int, count: int) -> torch.Tensor:
    """The carried frames' latents (``which`` 0) or noise (1) as ``(B, F, C, h, w)``, with
    zeros for the window's new frames (ignored: ``Carry.known`` is unset there)."""
    carried = [made[f][which] for f in frames[:count]]
    zeros = torch.zeros_like(carried[0])
    return torch.stack(carried + [zeros] * (len(frames) - count), dim=1)
