"""``eval.py mode=long``: one long held-out world clip (a minute at 25 fps) edited window
after window with and without anchor frames; drift of each second against the first (colour
mean, colour histogram, CLIP embedding), warp error across window seams against inside
windows, time and memory; a table, a CSV and a plot over time."""

from __future__ import annotations

import io
import math

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig
from tqdm.auto import tqdm

from data.synthetic import SyntheticWorldDataset
from data.world_render import render
from jobs.evaluation.measure import measured
from jobs.evaluation.settings import edit_settings
from model.editing.content import image_content
from model.editing.long import edit_long_video
from model.editing.pipeline import video_depth
from model.metrics.drift import DriftCurve, drift_curve, pair_warp_errors, seam_warp_error
from model.metrics.video import flow_valid_mask

DRIFTS = {"colour": "colour mean", "histogram": "colour histogram", "clip": "CLIP embedding"}


def long_clip(cfg: DictConfig) -> dict:
    """Test-split clip 0 of the world at ``long.num_frames`` frames (its bodies placed clear
    of the camera over the whole clip), rendered a piece at a time, with its exact flow and
    the first frame of clip 1 as the content reference."""
    world = SyntheticWorldDataset(
        num_clips=2,
        num_frames=cfg.long.num_frames,
        size=cfg.size,
        seed=cfg.world_seed,
        split="test",
        speed=cfg.speed,
    )
    clip = render(world.scene(0), cfg.long.num_frames, world.size)
    reference = render(world.scene(1), 1, world.size).frames
    return {
        "frames": clip.frames[None],
        "flow": clip.flow,
        "valid": flow_valid_mask(clip.flow, clip.surface),
        "reference": reference,
        "caption": world.scene(0).caption(),
    }


def edit_long(cfg: DictConfig, gen1, clip: dict, depth, anchors: list[int]):
    """The sequential edit of the clip with ``anchors``: frames ``(F, 3, H, W)``, the
    windows' ``[start, stop)`` and the cost."""
    settings = edit_settings(cfg, cfg.w_t, cfg.t_s, steps=cfg.long.steps)
    frames = clip["frames"]
    parts: list[torch.Tensor] = []
    bar = tqdm(total=frames.shape[1], desc=f"long edit, anchors {anchors}", unit="frame",
               disable=not cfg.progress)  # fmt: skip

    def sink(window, edited, source, window_depth):
        parts.append(edited[0])
        bar.update(edited.shape[1])

    device = next(gen1.parameters()).device
    result, cost = measured(
        lambda: edit_long_video(
            gen1,
            frames.shape[1],
            lambda idx: frames[:, idx],
            image_content(gen1, clip["reference"]),
            settings,
            sink,
            anchors=anchors,
            read_depth=lambda idx: depth[:, idx],
            generator=torch.Generator().manual_seed(cfg.seed),
            hold=float(cfg.long.hold),
        ),
        device,
    )
    bar.close()
    out = torch.cat(parts)
    return out, result.windows, {**cost, "seconds_per_frame": cost["seconds"] / out.shape[0]}


def run_long(cfg: DictConfig, gen1, estimator, _clips=None) -> dict:
    """Drift curves (input, and each anchors setting), seam and inside warp errors, costs;
    the table, the CSV and the plot."""
    clip = long_clip(cfg)
    depth = video_depth(gen1, clip["frames"], estimator, cfg.chunk_size)
    block = cfg.long.block
    curves = {"input": drift_curve(clip["frames"][0], block, gen1.clip)}
    rows = {}
    for label, anchors in cfg.long.anchors.items():
        frames, windows, cost = edit_long(cfg, gen1, clip, depth, list(anchors))
        curves[label] = drift_curve(frames, block, gen1.clip)
        pairs = pair_warp_errors(frames, clip["flow"], clip["valid"])
        across, inside = seam_warp_error(pairs, windows)
        rows[label] = {
            "anchors": list(anchors),
            "windows": len(windows),
            "warp_error": float(pairs.nanmean()),
            "warp_error_seams": across,
            "warp_error_inside": inside,
            **{f"{k}_drift_end": _tail(getattr(curves[label], k)) for k in DRIFTS},
            **{f"{k}_drift_max": max(getattr(curves[label], k)) for k in DRIFTS},
            **cost,
        }
    rows["input"] = {
        **{f"{k}_drift_end": _tail(getattr(curves["input"], k)) for k in DRIFTS},
        **{f"{k}_drift_max": max(getattr(curves["input"], k)) for k in DRIFTS},
        "warp_error": float(
            pair_warp_errors(clip["frames"][0], clip["flow"], clip["valid"]).nanmean()
        ),
    }
    fps = float(cfg.long.fps)
    return {
        "table": long_table(cfg, rows),
        "mean": rows,
        "curves": {k: vars(c) for k, c in curves.items()},
        "texts": {"long.csv": curves_csv(curves, fps)},
        "figures": {"long.png": plot_drift(curves, fps, cfg.long.num_frames)},
    }


def _tail(values: list[float], share: float = 1 / 6) -> float:
    """The mean of the last ``share`` of a curve (the last 10 s of a minute)."""
    count = max(1, math.ceil(len(values) * share))
    return sum(values[-count:]) / count


def long_table(cfg: DictConfig, rows: dict) -> str:
    """The markdown table of ``run_long``."""
    seconds = cfg.long.num_frames / cfg.long.fps
    head = (
        f"One held-out world clip of {cfg.long.num_frames} frames ({seconds:g} s at "
        f"{cfg.long.fps} fps, {cfg.size}x{cfg.size}), edited window after window "
        f"(window.mode=sequential, {cfg.window.length} frames, overlap {cfg.window.overlap}, "
        f"{cfg.long.steps} {cfg.sampler} steps, w={cfg.w}, t_s={cfg.t_s}). Drift: distance of "
        f"each {cfg.long.block}-frame block to the first block; 'end' is the mean over the "
        "last sixth of the clip, 'max' the largest. Warp error (x1e-3) with the world's exact "
        "flow, across window seams and inside windows.\n\n"
    )
    columns = (
        "| | colour end / max | histogram end / max | CLIP end / max | warp all | seams "
        "| inside | s / frame | peak MiB |"
    )
    lines = [columns, "|---" * 9 + "|"]
    for label, r in rows.items():
        drift = [f"{r[f'{k}_drift_end']:.4f} / {r[f'{k}_drift_max']:.4f}" for k in DRIFTS]
        warp = [
            f"{1e3 * r[k]:.2f}" if k in r else ""
            for k in ("warp_error", "warp_error_seams", "warp_error_inside")
        ]
        cost = [f"{r['seconds_per_frame']:.3f}" if "seconds_per_frame" in r else "",
                f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""]  # fmt: skip
        name = label if label == "input" else f"edit, anchors {label} {r['anchors']}"
        lines.append("| " + " | ".join([name, *drift, *warp, *cost]) + " |")
    return head + "\n".join(lines) + "\n"


def curves_csv(curves: dict[str, DriftCurve], fps: float) -> str:
    """One row per (video, block): its start in seconds and its drifts."""
    buffer = io.StringIO()
    buffer.write("video,start_frame,start_s,colour,histogram,clip\n")
    for label, curve in curves.items():
        for i, start in enumerate(curve.start):
            clip = curve.clip[i] if curve.clip is not None else float("nan")
            buffer.write(f"{label},{start},{start / fps:.3f},{curve.colour[i]:.6g},"
                         f"{curve.histogram[i]:.6g},{clip:.6g}\n")  # fmt: skip
    return buffer.getvalue()


def plot_drift(curves: dict[str, DriftCurve], fps: float, num_frames: int) -> Figure:
    """Each drift over time, one line per video (the input dashed: the scene's own change)."""
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    panels = figure.subplots(1, len(DRIFTS))
    for panel, (key, title) in zip(panels, DRIFTS.items(), strict=True):
        for label, curve in curves.items():
            values = getattr(curve, key)
            if values is None:
                continue
            seconds = [s / fps for s in curve.start]
            style = {"ls": "--", "color": "0.4"} if label == "input" else {}
            name = label if label == "input" else f"edit, anchors {label}"
            panel.plot(seconds, values, label=name, lw=1.4, **style)
        panel.set_title(f"{title}: distance to the first second")
        panel.set_xlabel("time (s)")
        panel.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    figure.suptitle(f"Drift of a {num_frames / fps:g} s edit, window after window")
    return figure
