"""Diagonal (FIFO) edits (model.editing.fifo): frames at staggered noise levels in one UNet
call, each stepped on its own. Where the frames do not see each other (mov2mov on the
Gen-1's image model), a diagonal edit must equal the plain edit exactly, for every sampler it
steps and with SDEdit strength, masks and keyframed strength; with the temporal layers on, the
queue holds no more than a window and every frame comes out once, in order."""

import pytest
import torch

from model.diffusion.samplers import DiscreteDenoiser
from model.editing.fifo import frames_per_level
from model.editing.fifo_queue import balanced_parts
from model.editing.long import edit_long_video
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.editing.streaming import shared_noise
from tests.test_editing import content_of, tiny_gen1, video


@pytest.fixture(scope="module")
def model():
    return tiny_gen1(temporal=True)


def fifo(model, frames, depth, settings, seed=3, **kwargs):
    parts, shown = [], []

    def sink(window, out, source, _depth):
        parts.append(out)
        shown.extend(window.new)

    result = edit_long_video(
        model,
        frames.shape[1],
        lambda idx: frames[:, idx],
        content_of(model, frames),
        settings,
        sink,
        read_depth=lambda idx: depth[:, idx],
        generator=torch.Generator().manual_seed(seed),
        mode="fifo",
        **kwargs,
    )
    return torch.cat(parts, dim=1), shown, result


def plain(model, frames, depth, settings, seed=3, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    common = shared_noise(model, frames.shape, generator)
    return edit_video(
        model,
        frames,
        content_of(model, frames),
        settings,
        depth=depth,
        generator=generator,
        common=common,
        **kwargs,
    )


@pytest.fixture
def calls(monkeypatch):
    """The frame count and sigma of every call of the model's denoiser."""
    seen = []
    call = DiscreteDenoiser.__call__

    def spy(self, x, sigma, **kwargs):
        seen.append((x.shape[1], torch.as_tensor(sigma).clone()))
        return call(self, x, sigma, **kwargs)

    monkeypatch.setattr(DiscreteDenoiser, "__call__", spy)
    return seen


def staggered(calls, skip=0):
    """The sigmas of the calls whose frames (after ``skip`` anchors) were at several levels."""
    return [s for _, s in calls if s.ndim == 2 and s[0, skip:].unique().numel() > 1]


@pytest.mark.parametrize(
    "sampler, strength, masked, per_level",
    [("dpmpp_2m", 1.0, False, 1), ("euler", 0.6, True, None), ("ddim", 0.75, False, 2)],
)
def test_frames_that_do_not_see_each_other_equal_the_plain_edit(
    model, calls, sampler, strength, masked, per_level
):
    """mov2mov runs the image model: each frame's prediction is its own, so stepping the
    frames at staggered levels must give each frame exactly the plain run's steps."""
    frames, depth = video(6)
    settings = EditSettings(
        steps=5, w=3.0, window_length=6, method="mov2mov", sampler=sampler,
        strength=strength, prepack=False,
    )  # fmt: skip
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 1, *frames.shape[-2:])
        mask[..., :, 8:] = 1.0
    read_mask = (lambda idx: mask) if masked else None
    out, shown, _ = fifo(
        model, frames, depth, settings, anchors=(), read_mask=read_mask, per_level=per_level
    )
    assert staggered(calls), "no call held frames at several levels"
    expected = plain(model, frames, depth, settings, mask=mask).frames
    assert shown == list(range(6))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_keyframed_strength_holds_each_frame_to_its_own_start(model):
    frames, depth = video(4)
    settings = EditSettings(steps=6, w=3.0, window_length=4, method="mov2mov", prepack=False)
    schedule = {"strength": torch.tensor([0.5, 0.6, 0.8, 1.0])}
    out, _, _ = fifo(
        model, frames, depth, settings, anchors=(), schedule_of=lambda idx: {
            k: v[idx] for k, v in schedule.items()})  # fmt: skip
    expected = plain(model, frames, depth, settings, schedule=schedule).frames
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_a_keyframe_schedule_acts_per_frame_as_in_the_plain_edit(model):
    """Per-frame content, w and t_s (a keyframe schedule) reach each frame of the queue as
    they reach the plain edit (equal to it); ignored, the last frames would differ."""
    frames, depth = video(6)
    settings = EditSettings(steps=4, w=3.0, window_length=6, method="mov2mov", prepack=False)
    content = content_of(model, frames)
    other = content_of(model, frames.flip(-1))
    per_frame = torch.cat(
        [content[:, None].expand(1, 3, 1, -1), other[:, None].expand(1, 3, 1, -1)], 1
    )
    schedule = {"w": torch.tensor([3.0, 3, 3, 5, 7, 9]), "t_s": torch.tensor([0.0, 0, 1, 2, 3, 4])}
    out, _, _ = fifo(
        model, frames, depth, settings, anchors=(),
        content_of=lambda idx: per_frame[:, idx],
        schedule_of=lambda idx: {k: v[idx] for k, v in schedule.items()},
    )  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    expected = edit_video(
        model, frames, per_frame, settings, depth=depth, generator=generator,
        common=shared_noise(model, frames.shape, generator), schedule=schedule,
    ).frames  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    unscheduled, _, _ = fifo(model, frames, depth, settings, anchors=())
    assert (out[:, 4:] - unscheduled[:, 4:]).abs().max() > 1e-2


def test_video_model_calls_hold_a_window_at_staggered_levels(model, calls):
    """Gen-1 with temporal layers: every UNet call holds at most window_length frames, the
    frames of one call at several noise levels, the anchor at the lowest; frames come out
    once each, in order."""
    frames, depth = video(14)
    settings = EditSettings(steps=4, w=3.0, window_length=5, prepack=False)
    out, shown, _ = fifo(model, frames, depth, settings, anchors=(0,), per_level=1)
    assert shown == list(range(14)) and out.shape == frames.shape
    assert out.abs().max() <= 1 and torch.isfinite(out).all()
    assert max(n for n, _ in calls) <= 5
    anchored = [(n, s) for n, s in calls if n == 5]  # the anchor and four queued frames
    assert anchored and staggered(anchored, skip=1)
    for _, sigma in anchored:
        assert sigma[0, 0] == sigma[0].min()  # the anchor at the most advanced level


def test_frames_per_level_and_parts():
    assert [frames_per_level(room) for room in (8, 7, 6, 1)] == [3, 3, 2, 1]
    assert frames_per_level(8, 1) == 1
    with pytest.raises(ValueError, match="frames_per_level"):
        frames_per_level(8, 0)
    parts = balanced_parts(8, 7)
    assert [p.stop - p.start for p in parts] == [4, 4]
    assert [p.stop - p.start for p in balanced_parts(20, 7)] == [7, 6, 7]


def test_refusals_before_any_compute(model):
    frames, depth = video(4)
    with pytest.raises(ValueError, match="sampler 'heun'"):
        fifo(model, frames, depth, EditSettings(sampler="heun", window_length=4))
    with pytest.raises(ValueError, match="renders frame after frame"):
        fifo(model, frames, depth, EditSettings(method="prev_frame", strength=0.5))
    with pytest.raises(ValueError, match="anchors"):
        fifo(model, frames, depth, EditSettings(window_length=4), anchors=(5,))
