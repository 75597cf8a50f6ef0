"""Edit metrics on constructed inputs and on the procedural world's exact flow."""

import pytest
import torch
import torch.nn.functional as F

from data.synthetic import SyntheticWorldDataset
from data.world_render import render
from model.encoders.clip import build_clip
from model.metrics.video import (
    flow_valid_mask,
    frame_consistency,
    prompt_consistency,
    sharpness,
    structure_fidelity,
    warp_error,
)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip("clip_tiny")


@pytest.fixture(scope="module")
def world():
    """Three 8-frame test clips at 64x64 with their surface ids."""
    data = SyntheticWorldDataset(num_clips=3, num_frames=8, size=64, split="test")
    return [render(data.scene(i), 8, (64, 64)) for i in range(3)]


def test_frame_consistency_is_one_for_a_still_video_and_lower_for_changing_frames(clip):
    frame = torch.rand(1, 3, 32, 32) * 2 - 1
    assert frame_consistency(clip, frame.expand(5, -1, -1, -1)) == pytest.approx(1.0, abs=1e-5)
    changing = torch.rand(5, 3, 32, 32) * 2 - 1
    assert frame_consistency(clip, changing) < 0.999
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_consistency(clip, frame)


def test_prompt_consistency_is_the_mean_cosine_of_text_and_frames(clip):
    frames = torch.rand(3, 3, 32, 32) * 2 - 1
    images = F.normalize(clip.encode_image(frames), dim=-1)
    text = F.normalize(clip.encode_text("a red striped sphere"), dim=-1)[0]
    expected = float((images @ text).mean())
    assert prompt_consistency(clip, frames, "a red striped sphere") == pytest.approx(expected)
    assert -1 <= expected <= 1


def test_structure_fidelity_ignores_scale_and_shift_and_scores_unrelated_depth_near_one():
    gen = torch.Generator().manual_seed(0)
    depth = torch.rand(4, 1, 16, 16, generator=gen)
    assert structure_fidelity(depth, 3 * depth + 2) == pytest.approx(0.0, abs=1e-8)
    assert structure_fidelity(depth[:, 0], -0.5 * depth[:, 0] + 7) == pytest.approx(0.0, abs=1e-8)
    noisy = depth + 0.1 * torch.randn(depth.shape, generator=gen)
    unrelated = torch.rand(4, 1, 16, 16, generator=gen)
    assert 0.01 < structure_fidelity(depth, noisy) < 0.5
    assert structure_fidelity(depth, unrelated) == pytest.approx(1.0, abs=0.15)
    # A different output size is resized to the input's.
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    smooth = (xs + ys.square())[None, None].expand(4, 1, 32, 32)
    small = F.interpolate(smooth, size=(16, 16), mode="area")
    assert structure_fidelity(small, 3 * smooth + 2) < 1e-3
    with pytest.raises(ValueError, match="frames"):
        structure_fidelity(depth, depth[:3])


def test_warp_error_is_zero_for_an_exact_integer_shift_and_masks_what_leaves_the_frame():
    base = torch.rand(3, 24, 24) * 2 - 1
    frames = torch.stack([base.roll(2 * k, dims=-1) for k in range(4)])  # 2 px right per frame
    flow = torch.zeros(3, 2, 24, 24)
    flow[:, 0] = 2.0
    valid = flow_valid_mask(flow)
    assert not valid[:, :, -2:].any() and valid[:, :, :-2].all()
    assert warp_error(frames, flow) == pytest.approx(0.0, abs=1e-10)
    assert warp_error(frames, torch.zeros_like(flow)) > 0.1  # the wrong motion
    with pytest.raises(ValueError, match="flow must be"):
        warp_error(frames, flow[:2])


def test_warp_error_on_the_world_exact_clip_near_zero_shuffled_and_noised_far_larger(world):
    for clip in world:
        valid = flow_valid_mask(clip.flow, clip.surface)
        assert valid.float().mean() > 0.7  # most pixels are usable
        exact = warp_error(clip.frames, clip.flow, valid)
        shuffled = warp_error(clip.frames.flip(0), clip.flow, valid)  # played backwards
        rolled = warp_error(clip.frames.roll(3, dims=0), clip.flow, valid)
        gen = torch.Generator().manual_seed(1)
        noise = 0.1 * torch.randn(clip.frames.shape, generator=gen)
        noised = warp_error((clip.frames + noise).clamp(-1, 1), clip.flow, valid)
        assert exact < 1.5e-3
        assert min(shuffled, rolled, noised) > 8 * exact
    # The surface check removes occlusions and surface edges: the error where it holds is lower.
    clip = world[1]
    assert warp_error(clip.frames, clip.flow, flow_valid_mask(clip.flow, clip.surface)) < (
        warp_error(clip.frames, clip.flow)
    )


def test_sharpness_falls_with_blur():
    frames = torch.rand(2, 3, 32, 32) * 2 - 1
    kernel = torch.ones(3, 1, 5, 5) / 25
    blurred = F.conv2d(F.pad(frames, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    assert sharpness(blurred) < 0.2 * sharpness(frames)
    assert sharpness(torch.zeros(1, 3, 8, 8)) == 0.0


def test_estimated_flow_finds_a_shift_and_masks_what_leaves_the_frame():
    """Farneback on a smooth image moved 2 pixels right per frame: flow (2, 0) inside,
    invalid where a pixel would leave the frame; the warp error under it is near 0."""
    from model.metrics.flow import estimated_flow
    from model.metrics.video import warp_error

    gen = torch.Generator().manual_seed(0)
    base = (
        torch.nn.functional.interpolate(
            torch.rand(1, 3, 12, 20, generator=gen), size=(48, 80), mode="bicubic"
        ).clamp(0, 1)
        * 2
        - 1
    )
    frames = torch.cat([torch.roll(base, 2 * k, dims=-1) for k in range(3)])[:, :, :, 8:72]
    flow, valid = estimated_flow(frames)
    assert flow.shape == (2, 2, 48, 64) and valid.shape == (2, 48, 64)
    inside = flow[:, :, 8:-8, 8:-8]
    assert (inside[:, 0] - 2).abs().median() < 0.2 and inside[:, 1].abs().median() < 0.2
    assert not valid[:, :, -1].any()  # the last column moves out of the frame
    assert valid[:, 8:-8, 8:-8].float().mean() > 0.9
    assert warp_error(frames, flow, valid) < 0.1 * warp_error(frames, torch.zeros_like(flow))
