"""The procedural world: sample format, determinism, exact depth and exact flow."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.synthetic import SyntheticWorldDataset
from data.world_render import render


@pytest.fixture(autouse=True)
def one_thread():
    """Render on one thread, as DataLoader workers do: small ops lose on a busy pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` (C, H, W) bilinearly at each pixel centre moved by ``flow`` (2, H, W)."""
    _, height, width = image.shape
    rows, cols = torch.meshgrid(
        torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij"
    )
    grid = torch.stack([(cols + flow[0]) / width, (rows + flow[1]) / height], -1) * 2 - 1
    return F.grid_sample(image[None], grid[None], align_corners=False)[0]


def test_samples_have_the_documented_format_and_caption():
    dataset = SyntheticWorldDataset(num_clips=4, num_frames=6, size=(64, 96), seed=3)
    sample = dataset[1]
    assert set(sample) == {"frames", "caption", "is_video", "key", "depth", "flow"}
    assert sample["frames"].shape == (6, 3, 64, 96) and sample["frames"].dtype == torch.float32
    assert -1 <= sample["frames"].min() < sample["frames"].max() <= 1
    assert sample["depth"].shape == (6, 1, 64, 96) and sample["depth"].min() >= 0
    assert sample["flow"].shape == (5, 2, 64, 96)
    assert sample["is_video"] is True and sample["key"] == "world#4#6x64x96"
    scene = dataset.scene(1)
    assert sample["caption"].count(" and ") == len(scene.bodies) - 1
    for body in scene.bodies:
        assert f"{body.material.describe()} {body.shape}" in sample["caption"]
    assert sample["caption"].endswith(f"{scene.floor.describe()} floor")
    assert scene.floor.pattern in sample["caption"]


def test_captions_name_only_the_bodies_in_view():
    dataset = SyntheticWorldDataset(40, num_frames=2, size=32, seed=0)
    captions = {i: dataset[i]["caption"] for i in range(40)}
    hidden = [i for i in captions if captions[i] != dataset.scene(i).caption()]
    assert hidden  # some scenes place a body out of view or behind another
    for i in hidden:
        surface = render(dataset.scene(i), 2, (32, 32)).surface
        unseen = set(range(len(dataset.scene(i).bodies))) - {
            k - 1 for k in surface.unique().tolist()
        }
        assert unseen
        for k in unseen:
            body = dataset.scene(i).bodies[k]
            assert f"{body.material.describe()} {body.shape}" not in captions[i]


def test_clips_are_deterministic_per_seed_and_splits_are_disjoint():
    first, again = SyntheticWorldDataset(8, 4, 64, seed=5), SyntheticWorldDataset(8, 4, 64, seed=5)
    for i in (0, 7):
        assert all(torch.equal(first[i][k], again[i][k]) for k in ("frames", "depth", "flow"))
    assert not torch.equal(first[0]["frames"], first[1]["frames"])
    seeds = {
        split: {SyntheticWorldDataset(1000, 2, 64, split=split).scene_seed(i) for i in range(1000)}
        for split in ("train", "val", "test")
    }
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"])
    assert not seeds["val"] & seeds["test"]


def test_single_frame_items_are_images():
    sample = SyntheticWorldDataset(2, num_frames=1, size=32)[0]
    assert sample["frames"].shape == (1, 3, 32, 32) and sample["is_video"] is False
    assert "flow" not in sample and sample["depth"].shape == (1, 1, 32, 32)


def test_warping_the_next_frame_with_the_flow_gives_the_current_frame():
    dataset = SyntheticWorldDataset(4, num_frames=6, size=64, split="test")
    for index in range(4):
        clip = render(dataset.scene(index), 6, (64, 64))
        exact, shifted = [], []
        for f in range(5):
            flow = clip.flow[f]
            rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
            x, y = cols + 0.5 + flow[0], rows + 0.5 + flow[1]
            inside = (x > 1) & (x < 63) & (y > 1) & (y < 63)
            # Visible in both frames: all four pixels the sample mixes show the same surface.
            x0, y0 = (x - 0.5).floor().long().clamp(0, 62), (y - 0.5).floor().long().clamp(0, 62)
            visible = inside & (clip.inverse_depth[f, 0] > 1 / 8)  # well-sampled texture
            for dy in (0, 1):
                for dx in (0, 1):
                    visible &= clip.surface[f + 1][y0 + dy, x0 + dx] == clip.surface[f]
            error = (warp(clip.frames[f + 1], flow) - clip.frames[f]).abs().mean(0)
            wrong = (warp(clip.frames[f + 1], flow + 0.5) - clip.frames[f]).abs().mean(0)
            exact.append(error[visible])
            shifted.append(wrong[visible])
        exact, shifted = torch.cat(exact), torch.cat(shifted)
        assert exact.numel() > 5000
        assert exact.mean() < 0.02 and exact.mean() < 0.4 * shifted.mean()


def test_depth_and_flow_agree_with_the_scene_geometry():
    """Rebuild every pixel's 3-D point from the inverse depth (float64, independently of the
    renderer), check it lies on its surface, move it with its body and reproject it."""
    dataset = SyntheticWorldDataset(6, num_frames=4, size=(48, 64), seed=11)
    checked_spheres = checked_moving = 0
    for index in range(6):
        scene, (height, width) = dataset.scene(index), dataset.size
        clip = render(scene, 4, (height, width))
        times = torch.arange(5, dtype=torch.float32)
        position, right, up, forward = (v.double() for v in scene.camera.pose(times))
        rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        a = torch.from_numpy((cols - width / 2) / clip.focal)[..., None]
        b = torch.from_numpy((rows - height / 2) / clip.focal)[..., None]
        for f in range(3):
            rays = forward[f] + a * right[f] - b * up[f]
            inverse = clip.inverse_depth[f, 0].double()
            surface = clip.surface[f]
            point = position[f] + rays / inverse.clamp(min=1e-9)[..., None]
            moved = torch.where((surface == -1)[..., None], rays, point)  # sky: a direction
            floor = surface == 0
            assert point[floor][:, 1].abs().max() < 1e-3
            for k, body in enumerate(scene.bodies, start=1):
                mask = surface == k
                rotation, origin = (v.double() for v in body.pose(times))
                local = (point[mask] - origin[f]) @ rotation[f]
                if body.shape == "sphere":
                    assert (local.norm(dim=-1) - body.dims[0]).abs().max() < 1e-3
                    checked_spheres += int(mask.any())
                moved[mask] = local @ rotation[f + 1].T + origin[f + 1]
                checked_moving += int(mask.any() and body.velocity != (0.0, 0.0))
            relative = moved - torch.where((surface == -1)[..., None], 0.0, position[f + 1])
            z = relative @ forward[f + 1]
            x = width / 2 + clip.focal * (relative @ right[f + 1]) / z - torch.from_numpy(cols)
            y = height / 2 - clip.focal * (relative @ up[f + 1]) / z - torch.from_numpy(rows)
            expected = torch.stack([x, y]).float()
            assert (clip.flow[f] - expected).abs().max() < 2e-2
    assert checked_spheres and checked_moving  # the seeds cover spheres and moving bodies


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "holdout"}, "split must be one of"),
        ({"num_objects": (3, 1)}, "num_objects"),
        ({"size": 60}, "multiple of 8"),
        ({"num_frames": 0}, "num_frames"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticWorldDataset(**kwargs)
