"""Keyframes (model.editing.keyframes): interpolation, parsing, and per-frame settings in the
pipeline, each with an identity case (a constant schedule equals the plain edit) and a case
that fails if the schedule were ignored. The tiny Gen-1 at 32x32, 2 steps."""

import dataclasses

import pytest
import torch

import infer
from data import media
from model.editing.keyframes import (
    content_schedule,
    parse_keyframes,
    scalar_schedule,
    slerp,
)
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from tests import test_infer
from tests.test_editing import content_of, tiny_gen1, video
from tests.test_infer import FAST, config

files = test_infer.files  # the media fixture of infer's tests

SETTINGS = EditSettings(steps=2, w=3.0, window_length=4, window_overlap=1, prepack=False)


@pytest.fixture(scope="module")
def model():
    return tiny_gen1(temporal=True)


def test_scalars_move_linearly_between_keyframes_and_hold_outside():
    keys = parse_keyframes([{"frame": 2, "w": 1.0}, {"frame": 6, "w": 5.0}, {"frame": 4}])
    values = scalar_schedule(keys, "w", 7.5, range(9))
    assert values.tolist() == [1, 1, 1, 2, 3, 4, 5, 5, 5]
    assert scalar_schedule(keys, "t_s", 3, range(3)).tolist() == [3, 3, 3]  # none gives it


def test_slerp_keeps_the_endpoints_and_moves_along_the_sphere():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    torch.testing.assert_close(slerp(a, b, torch.tensor(0.0)), a)
    torch.testing.assert_close(slerp(a, b, torch.tensor(1.0)), b)
    mid = slerp(a, b, torch.tensor(0.5))
    torch.testing.assert_close(mid, torch.tensor([3.0, 3.0]) / 2**0.5 * 1.0)  # 45 deg, norm 3
    embeddings = torch.stack([a, b])[:, None]  # (K, 1, D)
    frames = content_schedule([0, 10], embeddings, [0, 5, 10, 12])
    assert frames.shape == (4, 1, 2)
    torch.testing.assert_close(frames[1, 0], mid)
    torch.testing.assert_close(frames[3, 0], b)


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"frame": 0, "colour": 1}], "unknown key 'colour'"),
        ([{"prompt": "x"}], "frame must be a frame number"),
        ([{"frame": 0}, {"frame": 0}], "given twice"),
        ([{"frame": 9}], "outside the 8 edited"),
        ([{"frame": 0, "prompt": "a", "reference": "b.png"}], "not both"),
        ([{"frame": 0, "strength": 1.5}], "strength must be in"),
        ([{"frame": 0, "w_t": "high"}], "w_t must be a number"),
        ([{"frame": 0, "lora": 0.5}], "lora must be a list of weights"),
        ([{"frame": 0, "lora": [1, "x"]}], "lora must be a list of weights"),
    ],
)
def test_bad_keyframes_are_one_line(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_keyframes(entries, num_frames=8)


def edit(model, frames, depth, content, settings=SETTINGS, **kwargs):
    return edit_video(
        model, frames, content, settings, depth=depth,
        generator=torch.Generator().manual_seed(5), **kwargs,
    ).frames  # fmt: skip


def test_a_constant_schedule_equals_the_plain_edit(model):
    frames, depth = video(6)
    content = content_of(model, frames)
    settings = dataclasses.replace(SETTINGS, strength=0.5, w_t=1.5, t_s=2)
    plain = edit(model, frames, depth, content, settings)
    schedule = {
        "w": torch.full((6,), 3.0),
        "w_t": torch.full((6,), 1.5),
        "t_s": torch.full((6,), 2.0),
        "strength": torch.full((6,), 0.5),
    }
    per_frame = content[:, None].expand(1, 6, 1, -1)
    scheduled = edit(model, frames, depth, per_frame, settings, schedule=schedule)
    torch.testing.assert_close(scheduled, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["w", "w_t", "t_s", "content"])
def test_a_value_given_at_one_frame_changes_the_edit(model, key):
    frames, depth = video(6)
    content = content_of(model, frames)
    plain = edit(model, frames, depth, content, dataclasses.replace(SETTINGS, w_t=1.5))
    schedule, per_frame = {}, content
    if key == "content":
        per_frame = content[:, None].repeat(1, 6, 1, 1)
        per_frame[:, 5] = content_of(model, frames[:, 3:]) * 3
    else:
        base = {"w": 3.0, "w_t": 1.5, "t_s": 3.0}[key]
        schedule[key] = torch.full((6,), base)
        schedule[key][5] = base + 2
    out = edit(model, frames, depth, per_frame, dataclasses.replace(SETTINGS, w_t=1.5),
               schedule=schedule)  # fmt: skip
    assert (out[:, 5] - plain[:, 5]).abs().max() > 1e-3


def test_each_frame_starts_at_its_own_strength(model):
    """strength 0 at a frame returns its source through the VAE (as a strength-0 edit);
    the strongest frame is edited."""
    frames, depth = video(4)
    content = content_of(model, frames)
    schedule = {"strength": torch.tensor([0.0, 0.5, 1.0, 1.0])}
    out = edit(model, frames, depth, content, schedule=schedule)
    untouched = edit(model, frames, depth, content, dataclasses.replace(SETTINGS, strength=0.0))
    torch.testing.assert_close(out[:, 0], untouched[:, 0], atol=1e-5, rtol=0)
    assert (out[:, 2] - untouched[:, 2]).abs().mean() > 0.05


def test_infer_keyframes_schedule_the_edit_and_the_sidecar_records_it(files, tmp_path):
    """w moving from 1 to 12 over the 12 frames: the sidecar's schedule is linear, the edit
    differs from the plain one (w 3 throughout), and a keyframes file (YAML) gives the
    same edit as the list."""
    base = [
        f"input={files / 'clip.mp4'}", f"checkpoint={files / 'tiny.ckpt'}",
        f"reference={files / 'red.png'}", f"depth={files / 'depth.npy'}", "end=12",
        "prepack=false", *FAST,
    ]  # fmt: skip
    keyframes = "keyframes=[{frame: 0, w: 1}, {frame: 11, w: 12}]"
    plain = infer.run(config(*base, f"output={tmp_path / 'plain.mp4'}"))
    keyed = infer.run(config(*base, f"output={tmp_path / 'keyed.mp4'}", keyframes))
    assert keyed["keyframes"]["schedule"]["w"] == [1.0 + k for k in range(12)]
    assert not torch.equal(plain["result"].frames, keyed["result"].frames)
    (tmp_path / "keys.yaml").write_text("- {frame: 0, w: 1}\n- {frame: 11, w: 12}\n")
    from_file = infer.run(
        config(*base, f"output={tmp_path / 'file.mp4'}", f"keyframes={tmp_path / 'keys.yaml'}")
    )
    assert from_file["keyframes"] == keyed["keyframes"], from_file.get("keyframes")
    assert torch.equal(from_file["result"].frames, keyed["result"].frames)


@pytest.mark.parametrize(
    "keyframes, message",
    [
        ("[{frame: 30, w: 2}]", "outside the 12 edited"),
        ("[{frame: 0, reference: none.png}]", "reference not found"),
        ("[{frame: 0, tint: 2}]", "unknown key 'tint'"),
        ("missing.yaml", "keyframes file not found"),
    ],
)
def test_bad_keyframes_through_infer_are_one_line(files, tmp_path, capfd, keyframes, message):
    cfg = config(
        f"input={files / 'clip.mp4'}", f"output={tmp_path / 'o.mp4'}",
        f"checkpoint={files / 'tiny.ckpt'}", "reference_frame=0", "end=12", *FAST,
        f"keyframes={keyframes}",
    )  # fmt: skip
    assert infer.cli(cfg) == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o.mp4").exists()


def test_a_feathered_mask_video_keeps_the_outside_exactly_and_softens_the_edge(files):
    from jobs.editing.inputs import feather

    mask = torch.zeros(1, 3, 1, 24, 32)
    mask[..., 8:] = 1.0  # a moving edge would do the same frame by frame
    soft = feather(mask, 2.0)
    assert soft[..., :8].eq(0).all()  # outside: untouched, so the source passes exactly
    assert 0 < soft[0, 0, 0, 12, 8] < 0.6 and soft[0, 0, 0, 12, 20] > 0.99


@pytest.mark.parametrize(
    "method", ["mov2mov", "cross_frame", "motion_noise", "multi_frame", "prev_frame"]
)
def test_every_method_takes_a_schedule(model, method):
    """Per-frame w and content reach every method: a higher w at the last frame changes it."""
    frames, depth = video(4)
    content = content_of(model, frames)
    settings = dataclasses.replace(SETTINGS, method=method, strength=0.8)
    plain = edit(model, frames, depth, content, settings)
    schedule = {"w": torch.tensor([3.0, 3.0, 3.0, 9.0])}
    per_frame = content[:, None].expand(1, 4, 1, -1)
    out = edit(model, frames, depth, per_frame, settings, schedule=schedule)
    torch.testing.assert_close(out[:, 0], plain[:, 0], atol=1e-4, rtol=0)
    assert (out[:, 3] - plain[:, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["blend", "sequential", "fifo"])
def test_a_mask_video_moves_the_edited_region_frame_by_frame(files, tmp_path, mode):
    """A mask video (the input's 24 frames): the left half edited in frames 0-5, the right
    half after; the other half of each edited frame is the input's (up to yuv420p), in both
    window modes."""
    from data.io import write_video

    masks = torch.full((24, 3, 48, 64), -1.0)
    masks[:6, :, :, :32] = 1.0
    masks[6:, :, :, 32:] = 1.0
    write_video(tmp_path / "mask.mp4", masks, 12, crf=0)
    out = tmp_path / "masked.mp4"
    infer.run(config(
        f"input={files / 'clip.mp4'}", f"output={out}", f"checkpoint={files / 'tiny.ckpt'}",
        f"reference={files / 'red.png'}", f"mask={tmp_path / 'mask.mp4'}", "end=12",
        f"window.mode={mode}", *FAST,
    ))  # fmt: skip
    edited = torch.from_numpy(test_infer.read(out)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    source = media.read_frames(files / "clip.mp4", list(range(12)), (24, 32))[0]
    error = (edited - source).abs()
    kept = torch.cat([error[:6, ..., 20:], error[6:, ..., :12]]).mean()
    changed = torch.cat([error[:6, ..., :12], error[6:, ..., 20:]]).mean()
    assert kept < 0.1 < 0.5 < changed


def test_mask_depth_and_hint_files_may_hold_just_the_edited_frames(files, tmp_path):
    """A file for frames 6-17 of the 24-frame input is read as it is; a file of another
    length names both counts that would fit."""
    import numpy as np

    from data.io import write_video

    source = media.probe_video(files / "clip.mp4")
    indices = list(range(6, 18))
    ramp = np.linspace(0, 1, 12, dtype=np.float32)[:, None, None] * np.ones((12, 48, 64))
    np.save(tmp_path / "depth.npy", ramp)
    depth = media.read_depth(tmp_path / "depth.npy", source, indices, (24, 32))
    torch.testing.assert_close(depth[0, :, 0, 0, 0], torch.from_numpy(ramp[:, 0, 0]).float())
    hint = media.read_hint(tmp_path / "depth.npy", source, indices, (24, 32))
    assert hint.shape == (1, 12, 3, 24, 32)
    write_video(tmp_path / "mask.mp4", torch.ones(12, 3, 48, 64), 12)
    assert media.read_mask(tmp_path / "mask.mp4", source, indices, (24, 32)).shape[1] == 12
    np.save(tmp_path / "odd.npy", ramp[:5])
    with pytest.raises(media.MediaError, match="has 5 frames; it needs the input's 24 or the 12"):
        media.read_depth(tmp_path / "odd.npy", source, indices, (24, 32))
