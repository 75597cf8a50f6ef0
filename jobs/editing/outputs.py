"""What an edit writes: the mp4 (frames at their output times, the audio of the kept span),
the optional side-by-side preview and the JSON sidecar, staged in temporary files and moved
into place together."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import av
import decord
import torch
from omegaconf import DictConfig, OmegaConf

from data.io import VideoWriter
from jobs.editing.inputs import Inputs
from jobs.editing.request import edit_settings
from model.weights.atomic import atomic_output, file_sha256


@contextmanager
def staged_outputs(paths: list[Path]):
    """Temporary files beside ``paths`` (same suffix); moved into place only on success."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_output(path)) for path in paths]


class Outputs:
    """The edit's open output files: ``add`` writes frames as they are made (the mp4 and
    the preview's input | depth | output panels, all cropped to the output size); the
    caller sets ``sidecar`` before the files are moved into place."""

    def __init__(self, video: VideoWriter, preview: VideoWriter | None, geometry) -> None:
        self.video, self.preview, self.geometry = video, preview, geometry
        self.sidecar: dict | None = None

    def add(self, edited: torch.Tensor, source: torch.Tensor, depth: torch.Tensor | None) -> None:
        """Write the next frames: ``edited`` and ``source`` ``(n, 3, H, W)`` in [-1, 1] and
        their ``depth`` ``(n, 1, H, W)`` in [-1, 1] or None, at the working size."""
        edited = self.geometry.crop(edited)
        self.video.write(edited)
        if self.preview is not None:
            depth = self.geometry.crop(depth) if depth is not None else None
            depth = depth.expand(-1, 3, -1, -1) if depth is not None else torch.zeros_like(edited)
            panels = [self.geometry.crop(source), depth, edited]
            self.preview.write(torch.cat(panels, dim=-1))


@contextmanager
def output_files(cfg: DictConfig, inputs: Inputs, started: float) -> Iterator[Outputs]:
    """The mp4 (with the kept span's audio), the preview and the sidecar, written to
    temporary files while the edit runs and moved into place together when it succeeds (the
    sidecar's timing completed here); nothing is left behind when it fails."""
    output = Path(cfg.output)
    paths = [output.with_suffix(".json"), output]
    if cfg.preview:
        paths.append(output.with_name(output.stem + ".preview.mp4"))
    height, width = inputs.geometry.output
    with staged_outputs(paths) as temps, ExitStack() as writers:
        video = writers.enter_context(
            VideoWriter(temps[1], (height, width), inputs.times, crf=cfg.crf, audio=inputs.audio)
        )
        preview = None
        if cfg.preview:
            preview = writers.enter_context(
                VideoWriter(temps[2], (height, 3 * width), inputs.times, crf=cfg.crf)
            )
        outputs = Outputs(video, preview, inputs.geometry)
        yield outputs
        writers.close()  # flushed and closed before the sidecar says how long it all took
        sidecar = outputs.sidecar
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
        "queue": getattr(result, "queue", None) or None,  # window.mode=fifo: no windows
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
