"""What an edit writes: the mp4 (frames at their output times, the audio of the kept span),
the optional side-by-side preview and the JSON sidecar, staged in temporary files and moved
into place together."""

from __future__ import annotations

import json
import platform
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import av
import decord
import torch
from omegaconf import DictConfig, OmegaConf

from data.io import write_video
from jobs.editing.inputs import Inputs
from jobs.editing.request import edit_settings
from model.weights.atomic import atomic_output, file_sha256


@contextmanager
def staged_outputs(paths: list[Path]):
    """Temporary files beside ``paths`` (same suffix); moved into place only on success."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_output(path)) for path in paths]


def write_outputs(cfg: DictConfig, inputs: Inputs, result, sidecar: dict, started: float):
    """The mp4 (with the kept span's audio), the preview and the sidecar (its timing
    completed here), staged in temporary files and moved into place together."""
    output = Path(cfg.output)
    paths = [output.with_suffix(".json"), output]
    if cfg.preview:
        paths.append(output.with_name(output.stem + ".preview.mp4"))
    fps = sidecar["frames"]["fps"]
    with staged_outputs(paths) as temps:
        write_video(
            temps[1], result.frames[0], fps, crf=cfg.crf, times=inputs.times, audio=inputs.audio
        )
        if cfg.preview:
            frames = inputs.geometry.crop(inputs.frames[0])
            depth = result.depth[0] if result.depth is not None else torch.zeros_like(frames)
            panels = [frames, depth.expand(-1, 3, -1, -1), result.frames[0]]
            write_video(temps[2], torch.cat(panels, dim=-1), fps, crf=cfg.crf, times=inputs.times)
        timing = sidecar["timing"]
        timing["write_s"] = time.perf_counter() - started - sum(timing.values())
        timing["total_s"] = time.perf_counter() - started
        temps[0].write_text(json.dumps(sidecar, indent=2) + "\n")


def describe(
    cfg: DictConfig, inputs: Inputs, result, seed: int, model, device, dtype, kind: str
) -> dict:
    """The sidecar: every resolved setting, the seed, the checkpoint's sha256 and what it is,
    the method that ran, frames, sizes, media."""
    source, times = inputs.source, inputs.times
    checkpoint = {
        "path": str(Path(cfg.checkpoint).resolve()),
        "sha256": file_sha256(cfg.checkpoint),
        "format": kind,
    }
    if kind == "sd":
        checkpoint["model"] = model.describe()
    return {
        "input": str(Path(cfg.input).resolve()),
        "output": str(Path(cfg.output).resolve()),
        "checkpoint": checkpoint,
        "method": result.method,
        "method_settings": result.method_settings,  # the method's own (model.editing.methods)
        "seed": seed,
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "edit": asdict(edit_settings(cfg)),
        "source": source.summary(),
        "frames": {
            "indices": inputs.indices,
            "count": len(inputs.indices),
            "fps": source.fps / cfg.stride,
            "timing": inputs.timing,
            "times_s": [float(p * times.time_base) for p in times.pts],
            "duration_s": times.duration_s,
        },
        "rotation": source.rotation,  # degrees clockwise applied on reading (then mirrored)
        "size": {
            "output": list(inputs.geometry.output),
            "working": list(inputs.geometry.working),  # padded for the model, cropped back
            "latent": [s // model.vae.downsample_factor for s in inputs.geometry.working],
        },
        "windows": result.windows,
        "steps_run": result.steps_run,  # of edit.steps: strength x steps, at least one
        "audio": inputs.audio.description,
        "audio_span_s": list(inputs.audio.span_s) if inputs.audio.span_s else None,
        "device": str(device),
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "av": av.__version__,
            "decord": decord.__version__,
        },
    }
