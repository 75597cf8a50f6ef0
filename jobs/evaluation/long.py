"""``eval.py mode=long``: one long held-out world clip (a minute at 25 fps) edited window
after window (``window.mode=sequential``) and by diagonal denoising (``fifo``), each with and
without anchor frames; drift of each second against the first (colour mean, colour
histogram, CLIP embedding), warp error across the sequential edit's window seams against
inside its windows (for both modes: a diagonal edit has no windows, so its pairs there should
be no worse), time and memory; a table, a CSV and a plot over time."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig
from tqdm.auto import tqdm

from data.media import MediaError, probe_video, read_frames
from data.synthetic import SyntheticWorldDataset
from data.world_render import render
from jobs.evaluation.measure import measured
from jobs.evaluation.settings import EvalError, edit_settings
from model.editing.content import image_content
from model.editing.long import edit_long_video, long_windows
from model.editing.pipeline import video_depth
from model.metrics.drift import (
    DriftCurve,
    drift_curve,
    pair_warp_errors,
    periodic_step,
    seam_warp_error,
)
from model.metrics.flow import estimated_flow
from model.metrics.video import flow_valid_mask, sharpness, structure_fidelity

DRIFTS = {"colour": "colour mean", "histogram": "colour histogram", "clip": "CLIP embedding"}


def long_clip(cfg: DictConfig) -> dict:
    """The clip ``long.input`` (a real video; ``real_clip``) or test-split clip 0 of the
    world at ``long.num_frames`` frames (its bodies placed clear of the camera over the
    whole clip), rendered a piece at a time, with its exact flow; the first frame of world
    clip 1 is the content reference either way."""
    if cfg.long.get("input"):
        return real_clip(cfg)
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


def real_clip(cfg: DictConfig) -> dict:
    """The first ``long.num_frames`` frames (all, if it has fewer) of the video
    ``long.input`` at ``size`` pixels high (the width keeping its aspect, a multiple of 8),
    with its flow estimated (``model.metrics.flow``), and the world's content reference."""
    path = Path(cfg.long.input)
    try:
        source = probe_video(path, audio=False)
    except MediaError as err:
        raise EvalError(f"long.input: {err}") from err
    count = min(int(cfg.long.num_frames), source.num_frames)
    height, width = source.height, source.width
    size = (cfg.size, max(8, round(cfg.size * width / height / 8) * 8))
    frames = read_frames(source, list(range(count)), size)
    flow, valid = estimated_flow(frames[0])
    world = SyntheticWorldDataset(num_clips=2, num_frames=1, size=cfg.size,
                                  seed=cfg.world_seed, split="test")  # fmt: skip
    reference = render(world.scene(1), 1, world.size).frames
    return {"frames": frames, "flow": flow, "valid": valid, "reference": reference,
            "caption": path.stem, "name": path.name, "fps": source.fps}  # fmt: skip


def edit_long(cfg: DictConfig, gen1, clip: dict, depth, anchors: list[int], mode: str):
    """The edit of the clip window after window (``mode`` sequential) or by diagonal
    denoising (fifo) with ``anchors``: frames ``(F, 3, H, W)``, the ``[start, stop)`` of
    the frames each window of a sequential edit of these settings makes (where its seams
    fall, for both modes) and the cost."""
    settings = edit_settings(cfg, cfg.w_t, cfg.t_s, steps=cfg.long.steps)
    frames = clip["frames"]
    parts: list[torch.Tensor] = []
    bar = tqdm(total=frames.shape[1], desc=f"{mode} edit, anchors {anchors}", unit="frame",
               disable=not cfg.progress)  # fmt: skip

    def sink(window, edited, source, window_depth):
        parts.append(edited[0])
        bar.update(edited.shape[1])

    content = image_content(gen1, clip["reference"])
    device = next(gen1.parameters()).device
    _, cost = measured(
        lambda: edit_long_video(
            gen1,
            frames.shape[1],
            lambda idx: frames[:, idx],
            content,
            settings,
            sink,
            anchors=anchors,
            read_depth=lambda idx: depth[:, idx],
            generator=torch.Generator().manual_seed(cfg.seed),
            mode=mode,
            hold=float(cfg.long.hold),
        ),  # fmt: skip
        device,
    )
    bar.close()
    out = torch.cat(parts)
    plan = long_windows(out.shape[0], settings.window_length, settings.window_overlap, anchors)
    windows = [(w.new[0], w.new[-1] + 1) for w in plan]
    return out, windows, {**cost, "seconds_per_frame": cost["seconds"] / out.shape[0]}


def run_long(cfg: DictConfig, gen1, estimator, _clips=None) -> dict:
    """Drift curves (input, and each anchors setting), seam and inside warp errors, costs;
    the table, the CSV and the plot."""
    clip = long_clip(cfg)
    depth = video_depth(gen1, clip["frames"], estimator, cfg.chunk_size)
    block = cfg.long.block
    curves = {"input": drift_curve(clip["frames"][0], block, gen1.clip)}
    rows = {}
    runs = [(m, name, a) for m in cfg.long.modes for name, a in cfg.long.anchors.items()]
    for mode, name, anchors in runs:
        label = f"{mode} {name}"
        frames, windows, cost = edit_long(cfg, gen1, clip, depth, list(anchors), mode)
        curves[label] = drift_curve(frames, block, gen1.clip)
        pairs = pair_warp_errors(frames, clip["flow"], clip["valid"])
        across, inside = seam_warp_error(pairs, windows)
        step, period, phase = periodic_step(pairs, cfg.window.length)
        edited_depth = video_depth(gen1, frames[None], estimator, cfg.chunk_size)
        rows[label] = {
            "structure_fidelity": structure_fidelity(depth[0], edited_depth[0]),
            "sharpness": sharpness(frames),
            "mode": mode,
            "anchors": list(anchors),
            "windows": len(windows),
            "warp_error": float(pairs.nanmean()),
            "warp_error_seams": across,
            "warp_error_inside": inside,
            "periodic_step": step,
            "periodic_step_at": [period, phase],
            **{f"{k}_drift_end": _tail(getattr(curves[label], k)) for k in DRIFTS},
            **{f"{k}_drift_max": max(getattr(curves[label], k)) for k in DRIFTS},
            **cost,
        }
    rows["input"] = {
        "sharpness": sharpness(clip["frames"][0]),
        **{f"{k}_drift_end": _tail(getattr(curves["input"], k)) for k in DRIFTS},
        **{f"{k}_drift_max": max(getattr(curves["input"], k)) for k in DRIFTS},
        "warp_error": float(
            pair_warp_errors(clip["frames"][0], clip["flow"], clip["valid"]).nanmean()
        ),
    }
    fps = float(clip.get("fps", cfg.long.fps))
    return {
        "table": long_table(cfg, rows, clip, fps),
        "mean": rows,
        "curves": {k: vars(c) for k, c in curves.items()},
        "texts": {"long.csv": curves_csv(curves, fps)},
        "figures": {"long.png": plot_drift(curves, fps, clip["frames"].shape[1])},
    }


def _tail(values: list[float], share: float = 1 / 6) -> float:
    """The mean of the last ``share`` of a curve (the last 10 s of a minute)."""
    count = max(1, math.ceil(len(values) * share))
    return sum(values[-count:]) / count


def long_table(cfg: DictConfig, rows: dict, clip: dict, fps: float) -> str:
    """The markdown table of ``run_long``."""
    count, height, width = clip["frames"].shape[1], *clip["frames"].shape[-2:]
    what = f"The real clip {clip['name']}" if "name" in clip else "One held-out world clip"
    flow = "its flow estimated (Farneback, forward-backward checked)" if "name" in clip else (
        "the world's exact flow")  # fmt: skip
    head = (
        f"{what} of {count} frames ({count / fps:g} s at {fps:g} fps, {width}x{height}), "
        "edited window after window "
        f"(window.mode=sequential, {cfg.window.length} frames, overlap {cfg.window.overlap}) "
        f"and by diagonal denoising (window.mode=fifo, UNet calls of {cfg.window.length} "
        f"frames), {cfg.long.steps} {cfg.sampler} steps, w={cfg.w}, t_s={cfg.t_s}. Drift: "
        f"distance of each {cfg.long.block}-frame block to the first block; 'end' is the mean "
        f"over the last sixth of the clip, 'max' the largest. Warp error (x1e-3) with {flow}, "
        "across the sequential edit's window seams and inside its windows "
        "(the same frame pairs for both modes); worst step: the largest mean warp error of "
        "the pairs at one phase of a period P (2 to the window length) over the mean of all "
        "pairs, which finds a seam of any period (about 1: none). SF: structure fidelity, "
        "MiDaS depth of the edit against the input's (1 - r^2, lower is closer); sharpness: "
        "mean squared Laplacian of the luma (a frozen or blurred edit scores low warp error "
        "but loses these).\n\n"
    )
    columns = (
        "| | colour end / max | histogram end / max | CLIP end / max | warp all | seams "
        "| inside | worst step | SF | sharpness | s / frame | peak MiB |"
    )
    lines = [columns, "|---" * 12 + "|"]
    for label, r in rows.items():
        drift = [f"{r[f'{k}_drift_end']:.4f} / {r[f'{k}_drift_max']:.4f}" for k in DRIFTS]
        warp = [
            f"{1e3 * r[k]:.2f}" if k in r else ""
            for k in ("warp_error", "warp_error_seams", "warp_error_inside")
        ]
        step = ""
        if "periodic_step" in r:
            step = f"{r['periodic_step']:.2f}x (P {r['periodic_step_at'][0]})"
        looks = [step] + [
            f"{r[k]:.4f}" if k in r else "" for k in ("structure_fidelity", "sharpness")
        ]
        cost = [f"{r['seconds_per_frame']:.3f}" if "seconds_per_frame" in r else "",
                f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""]  # fmt: skip
        name = label if label == "input" else f"{r['mode']}, anchors {r['anchors']}"
        lines.append("| " + " | ".join([name, *drift, *warp, *looks, *cost]) + " |")
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
            name = label if label == "input" else label.replace(" ", ", anchors ")
            panel.plot(seconds, values, label=name, lw=1.4, **style)
        panel.set_title(f"{title}: distance to the first second")
        panel.set_xlabel("time (s)")
        panel.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    figure.suptitle(f"Drift of a {num_frames / fps:g} s edit")
    return figure
