"""mode=methods' statistics and rows without running the whole comparison: standard errors
and paired differences, the tables, CSV and plot they make, the ControlNet rows changing the
edit, and world clips at four times the camera speed moving motion-aware noise."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from data.synthetic import SyntheticWorldDataset
from data.world_render import render
from jobs.evaluation.clips import WorldClip
from jobs.evaluation.methods import (
    SD,
    SD_CONTROL,
    VIDEO_ROW,
    Arm,
    _editor,
    clip_motion,
    methods_csv,
    methods_tables,
    paired_difference,
    plot_methods,
    strongest_training_free,
)
from jobs.evaluation.reports import mean_scores, standard_errors
from model.editing.methods.motion_noise import motion_noise
from model.sd.controlnet import load_controlnet
from model.sd.loading import load_sd
from tests.sd_layout import ROOT

TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"
CONTROLNET = ROOT / "bundle" / "tiny_sd" / "tiny_controlnet_depth.safetensors"
ROWS = [f"{SD} / mov2mov", f"{SD} / cross_frame", f"{SD_CONTROL} / cross_frame", VIDEO_ROW]


def fake_clips(warps: dict[str, list[float]]) -> list[dict]:
    """Per-clip records with the given warp errors per row (other metrics fixed)."""
    n = len(next(iter(warps.values())))
    return [
        {
            "latent_motion": float(i),
            "motion_noise_equals_mov2mov": {SD: i == 0},
            "scores": {
                row: {
                    "frame_consistency": 0.9,
                    "warp_error": w[i],
                    "structure_fidelity": 0.1,
                    "prompt_consistency": 0.3,
                    "seconds_per_frame": 0.5,
                    "peak_mib": 20.0,
                }
                for row, w in warps.items()
            },  # fmt: skip
        }
        for i in range(n)
    ]


WARPS = {
    ROWS[0]: [0.010, 0.020, 0.030],
    ROWS[1]: [0.009, 0.018, 0.027],
    ROWS[2]: [0.011, 0.019, 0.031],
    ROWS[3]: [0.008, 0.019, 0.024],
    f"{SD} / motion_noise": [0.010, 0.019, 0.026],
}


def test_standard_errors_and_paired_differences():
    clips = fake_clips(WARPS)
    records = [c["scores"] for c in clips]
    se = standard_errors(records)
    assert se[ROWS[0]]["warp_error"] == pytest.approx(0.01 / math.sqrt(3))
    assert se[ROWS[0]]["structure_fidelity"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(standard_errors(records[:1])[ROWS[0]]["warp_error"])
    mean, error = paired_difference(clips, ROWS[3], ROWS[1], "warp_error")
    d = torch.tensor([-0.001, 0.001, -0.003], dtype=torch.float64)
    assert mean == pytest.approx(float(d.mean()))
    assert error == pytest.approx(float(d.std()) / math.sqrt(3))


def test_tables_csv_and_plot_report_means_errors_and_the_paired_findings():
    clips = fake_clips(WARPS)
    records = [c["scores"] for c in clips]
    means, errors = {"4": mean_scores(records)}, {"4": standard_errors(records)}
    cfg = OmegaConf.create({
        "num_clips": 3, "num_frames": 8, "size": 64, "sampler": "dpmpp_2m", "w": 7.5, "t_s": 3,
        "methods": {"steps": 8, "strength": 0.75, "controlnet": {"file": "cn.st", "scale": 1.0}},
    })  # fmt: skip
    table = methods_tables(cfg, means, errors, {"4": clips})
    assert f"| {ROWS[0]} | 0.9 ± 0 | 0.02 ± 0.0058 |" in table
    assert f"Lowest warp error without training: {ROWS[1]}" in table
    assert "paired over the 3 clips: warp error -0.001 ± 0.0012" in table
    assert f"of the video model's (<= 0.1): {ROWS[1]}" in table
    assert "2 of 3 clips move the noise" in table
    assert "motion_noise differs from mov2mov on 2 clips" in table
    assert strongest_training_free(means) == ROWS[1]
    csv = methods_csv(means, errors).splitlines()
    assert csv[0].startswith("speed,model,method,frame_consistency,frame_consistency_se,")
    assert len(csv) == 1 + len(WARPS)
    figure = plot_methods(means, errors)
    bars = [c for c in figure.axes[0].containers if c.has_xerr and c.has_yerr]
    assert len(bars) == len(WARPS)


@pytest.fixture(scope="module")
def world_clip():
    world = SyntheticWorldDataset(num_clips=8, num_frames=3, size=64, split="test", speed=4.0)
    clip = render(world.scene(3), 3, world.size)
    return WorldClip(3, "k", "c", clip.frames[None], clip.inverse_depth[None], clip.flow,
                     torch.ones(2, 64, 64), "r", clip.frames[:1], "c")  # fmt: skip


def test_controlnet_rows_edit_with_the_depth_controlnet(world_clip):
    """The ControlNet arm's edits differ from the SD arm's on the same clip, seed and prompt,
    and a ControlNet at scale 0 gives the SD arm's edit back."""
    sd = load_sd(TINY_SD)
    net = load_controlnet(CONTROLNET, sd.config.unet)
    cfg = OmegaConf.create({"seed": 0, "w_t": 1.0, "t_s": 3, "sampler": "dpmpp_2m",
                            "schedule": None, "w": 7.5, "eta": None, "steps": 2,
                            "noise_correlation": 0.0, "chunk_size": 8,
                            "window": {"length": 8, "overlap": 2},
                            "methods": {"steps": 2, "strength": 0.75}})  # fmt: skip
    content = sd.encode_prompt("a red sphere", "")
    depth = world_clip.depth
    plain, _ = _editor(cfg, Arm(sd, ["mov2mov"]), world_clip, content, depth)("mov2mov")
    controlled, cost = _editor(cfg, Arm(sd, ["mov2mov"], net), world_clip, content, depth)(
        "mov2mov"
    )
    off, _ = _editor(cfg, Arm(sd, ["mov2mov"], net, 0.0), world_clip, content, depth)("mov2mov")
    assert controlled.shape == plain.shape == (3, 3, 64, 64)
    assert (controlled - plain).abs().mean() > 1e-3
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=0)
    assert cost["seconds_per_frame"] > 0


def test_world_clips_at_four_times_the_speed_move_motion_aware_noise():
    """At x4 most held-out clips move by whole latent pixels, and there motion-aware noise is
    not mov2mov's one shared noise: frame 7's noise is frame 0's moved, not frame 0's."""
    world = SyntheticWorldDataset(num_clips=8, num_frames=8, size=64, split="test", speed=4.0)
    moving = 0
    for i in range(8):
        frames = render(world.scene(i), 8, world.size).frames[None]
        if clip_motion(frames, 4) < 1:
            continue
        moving += 1
        noise = motion_noise((1, 8, 4, 16, 16), frames, torch.Generator().manual_seed(0))
        assert not torch.equal(noise[:, 7], noise[:, 0])
    assert moving >= 6
