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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from model.editing.pipeline import Carry, edit_video
from model.editing.settings import EditSettings


@dataclass(frozen=True)
class LongWindow:
    """One window of a long edit, as frame indices of the video: ``anchors`` (carried from
    the first window), ``overlap`` (carried from the previous window), ``new`` (made here)."""

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


@dataclass
class LongEditResult:
    """What a long edit did (its frames went to the sink): ``plan`` its windows, ``windows``
    the ``[start, stop)`` of the frames each made, as ``EditResult.windows``."""

    plan: list[LongWindow] = field(default_factory=list)
    windows: list[tuple[int, int]] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)
    steps_run: int = 0
    method: str = ""
    method_settings: dict = field(default_factory=dict)
    window_calls: int = 0


FrameReader = Callable[[list[int]], torch.Tensor]  # frame indices -> (B, n, C, H, W)


@torch.no_grad()
def edit_long_video(
    model,
    num_frames: int,
    read_frames: FrameReader,
    content,
    settings: EditSettings,
    sink: Callable[[LongWindow, torch.Tensor, torch.Tensor, torch.Tensor | None], None],
    *,
    anchors: Sequence[int] = (0,),
    read_depth: FrameReader | None = None,
    read_mask: FrameReader | None = None,
    content_of: Callable[[list[int]], object] | None = None,
    control_of: Callable[[list[int]], object] | None = None,
    depth_estimator: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> LongEditResult:
    """Edit a video of ``num_frames`` frames window after window (``long_windows`` with
    ``settings.window_length`` / ``window_overlap`` and ``anchors``), in memory bounded by
    one window: ``read_frames(indices)`` gives the input frames ``(B, n, 3, H, W)`` in
    [-1, 1] of those indices, ``read_depth`` / ``read_mask`` their depth ``(B, n, 1, H, W)``
    and mask (optional); ``content_of(indices)`` / ``control_of(indices)`` the content and
    ControlNet units for those frames (default: ``content`` for all, no ControlNet).
    ``sink(window, edited, source, depth)`` receives every window's new frames, in order, as
    soon as they are decoded: ``edited`` and ``source`` ``(B, n_new, 3, H, W)`` in [-1, 1]
    on the CPU, ``depth`` ``(B, n_new, 1, H, W)`` in [-1, 1] (for previews) or None.

    Each window is ``edit_video`` with the carried frames fixed (``pipeline.Carry``); the
    noise of every frame is drawn once, in its window, from ``generator``. Raises
    ``ValueError`` as ``edit_video`` and ``long_windows`` do, before any compute.
    """
    windows = long_windows(num_frames, settings.window_length, settings.window_overlap, anchors)
    result = LongEditResult(
        plan=windows,
        windows=[(w.new[0], w.new[-1] + 1) for w in windows],
        anchors=sorted({int(a) for a in anchors}),
    )
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # frame -> (latents, noise)
    bar = tqdm(windows, desc="long edit (windows)", disable=not progress, unit="window")
    for window in bar:
        frames = window.frames
        carry = None
        if window.carried:
            carry = Carry(
                latents=_stack(made, frames, 0, window.carried),
                noise=_stack(made, frames, 1, window.carried),
                known=torch.arange(len(frames)) < window.carried,
            )
        source = read_frames(frames)
        edited = edit_video(
            model,
            source,
            content_of(frames) if content_of is not None else content,
            replace(settings, window_length=len(frames)),
            depth=read_depth(frames) if read_depth is not None else None,
            depth_estimator=depth_estimator,
            mask=read_mask(frames) if read_mask is not None else None,
            generator=generator,
            autocast_dtype=autocast_dtype,
            progress=False,
            control=control_of(frames) if control_of is not None else None,
            carry=carry,
        )
        end = window.new[-1] + 1
        keep = set(anchors) | set(range(end - settings.window_overlap, end))
        for position, frame in enumerate(frames):
            if frame in keep and frame not in made:
                made[frame] = (edited.latents[:, position], edited.noise[:, position])
        for frame in [f for f in made if f not in keep]:
            del made[frame]  # only anchors and the coming overlap stay: memory stays flat
        depth = edited.depth[:, window.carried :] if edited.depth is not None else None
        sink(window, edited.frames, source[:, window.carried :].float().cpu(), depth)
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
