"""infer.py's job as one function of its config: check, read, load, edit, write."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import sys
import time

import torch
from omegaconf import DictConfig

from jobs.editing.control import control_units, describe_control
from jobs.editing.inputs import read_inputs
from jobs.editing.loras import apply_loras, requested_loras
from jobs.editing.models import content_embedding, load_model
from jobs.editing.outputs import describe, write_outputs
from jobs.editing.request import (
    checkpoint_kind_of,
    device_and_dtype,
    edit_settings,
    resolve_checkpoint_defaults,
)
from model.diffusion.guidance import sdedit_steps
from model.diffusion.windows import window_slices
from model.editing.pipeline import edit_video

log = logging.getLogger("infer")


def announce(cfg: DictConfig, inputs, device, dtype, factor: int) -> None:
    """One line, before the long part, of what is about to happen."""
    settings = edit_settings(cfg)
    (h, w), (ph, pw) = inputs.geometry.output, inputs.geometry.working
    windows = window_slices(len(inputs.indices), settings.window_length, settings.window_overlap)
    padded = f" (padded to {pw}x{ph})" if (h, w) != (ph, pw) else ""
    log.info(
        "editing %d frames at %dx%d%s, latents %dx%d, %d window(s) of up to %d frames, "
        "%d of %d %s steps, on %s in %s",
        len(inputs.indices),
        w,
        h,
        padded,
        pw // factor,
        ph // factor,
        len(windows),
        settings.window_length,
        sdedit_steps(settings.steps, settings.strength),
        settings.steps,
        settings.sampler,
        device,
        str(dtype or torch.float32).removeprefix("torch."),
    )


def run(cfg: DictConfig) -> dict:
    """Edit ``cfg.input`` into ``cfg.output``; returns the sidecar dict plus ``result``."""
    clock = [time.perf_counter()]
    kind = checkpoint_kind_of(cfg)
    resolve_checkpoint_defaults(cfg, kind)
    loras = requested_loras(cfg)  # read and checked before any input is decoded
    inputs = read_inputs(cfg, kind)
    clock.append(time.perf_counter())
    device, dtype = device_and_dtype(cfg)
    model, estimator = load_model(cfg, inputs, device, dtype, kind)
    applied_loras = apply_loras(model, loras, kind)
    control = control_units(cfg, model, inputs, estimator, device, dtype)
    clock.append(time.perf_counter())
    seed = int(cfg.seed) if cfg.seed is not None else secrets.randbelow(2**31)
    announce(cfg, inputs, device, dtype, model.vae.downsample_factor)
    result = edit_video(
        model,
        inputs.frames,
        content_embedding(cfg, model, inputs, device, dtype, kind, seed),
        edit_settings(cfg),
        depth=inputs.depth,
        depth_estimator=estimator,
        mask=inputs.mask,
        generator=torch.Generator().manual_seed(seed),
        autocast_dtype=dtype,
        # Bars redraw in place: on a terminal only; a log file gets the lines around them.
        progress=cfg.progress and sys.stderr.isatty(),
        control=control,
    )
    geometry = inputs.geometry
    depth = geometry.crop(result.depth) if result.depth is not None else None
    result = dataclasses.replace(result, frames=geometry.crop(result.frames), depth=depth)
    clock.append(time.perf_counter())
    sidecar = describe(cfg, inputs, result, seed, model, device, dtype, kind)
    sidecar["lora"] = applied_loras
    if control is not None:
        sidecar["controlnet"] = describe_control(cfg)
    phases = ("read_s", "load_s", "edit_s")
    sidecar["timing"] = {k: b - a for k, a, b in zip(phases, clock[:-1], clock[1:], strict=True)}
    write_outputs(cfg, inputs, result, sidecar, clock[0])
    return {**sidecar, "result": result}
