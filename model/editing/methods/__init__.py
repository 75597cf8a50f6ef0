"""Editing methods: how the frames of an edit are made consistent, by name.

A method decides the starting noise of the frames, the guided denoiser the sampler runs, and
how the sampling is rendered (all frames in one run, or frame after frame); everything else
(conditioning, SDEdit ``strength``, masks, samplers, decoding) is the pipeline's
(``model.editing.pipeline``) and the same for every method. A model lists the methods it runs
in ``model.methods``, its default first: a Gen-1 video model ``("gen1", "mov2mov", ...)``, an
SD checkpoint ``("mov2mov", ...)``.

- ``gen1``: the video model over overlapping temporal windows with Gen-1's guidance
  (``w``, ``w_t``) and PYoCo-mixed noise (``noise_correlation``);
- ``mov2mov``: every frame through the image model on its own (img2img at ``strength``),
  classifier-free guidance ``w``, one noise draw shared by every frame;
- ``cross_frame``: mov2mov with cross-frame attention to anchor frames (``anchors``);
- ``motion_noise``: mov2mov from the first frame's noise moved along the input's motion;
- ``multi_frame``: each frame inpainted on a canvas beside the first and previous outputs;
- ``prev_frame``: each frame's SDEdit start is the previous output (``warp``: moved).

Training-free methods compose with ``+`` when each decides a different part (``roles``:
noise, denoiser, render): ``cross_frame+motion_noise`` is Text2Video-Zero's recipe,
``prev_frame+motion_noise`` a sequential edit from moving noise. A frame-by-frame render
(``prev_frame``, ``multi_frame``) runs one frame at a time, so it has no other frames to attend
to: it does not compose with ``cross_frame``.
"""

from __future__ import annotations

from typing import Any

import torch

from model.editing.methods.base import EditMethod, SamplingRun
from model.editing.methods.cross_frame import CrossFrame
from model.editing.methods.gen1 import Gen1Method
from model.editing.methods.motion_noise import MotionNoise
from model.editing.methods.mov2mov import Mov2Mov
from model.editing.methods.multi_frame import MultiFrame
from model.editing.methods.prev_frame import PrevFrame

METHODS: dict[str, EditMethod] = {
    m.name: m
    for m in (Gen1Method(), Mov2Mov(), CrossFrame(), MotionNoise(), MultiFrame(), PrevFrame())
}
TRAINING_FREE = ("mov2mov", "cross_frame", "motion_noise", "multi_frame", "prev_frame")
SEQUENTIAL = {"prev_frame", "multi_frame"}  # renders that make one frame at a time


class Composed:
    """Methods joined with ``+``: each part decides its ``roles`` (noise, denoiser, render),
    mov2mov the rest. Built by ``get_method``; its ``name`` is the joined names."""

    def __init__(self, parts: list[EditMethod]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.needs = "; ".join(f"{p.name}: {p.needs}" for p in parts)
        self.frames_independent = all(p.frames_independent for p in parts)
        self.roles = frozenset().union(*(p.roles for p in parts))
        base = METHODS["mov2mov"]
        self.of = {
            role: next((p for p in parts if role in p.roles), base)
            for role in ("noise", "denoiser", "render")
        }

    def noise(self, shape, settings: Any, generator, frames=None, common=None) -> torch.Tensor:
        return self.of["noise"].noise(shape, settings, generator, frames, common)

    def step_noise(self, shape, generator, device):
        return self.of["noise"].step_noise(shape, generator, device)

    def denoiser(self, model: Any, settings: Any, progress: bool = False):
        return self.of["denoiser"].denoiser(model, settings, progress)

    def cond_extra(self) -> dict:
        return self.of["denoiser"].cond_extra()

    def render(self, run: SamplingRun) -> torch.Tensor:
        return self.of["render"].render(run)

    def check(self, settings: Any, num_frames: int | None, masked: bool) -> None:
        for part in self.parts:
            part.check(settings, num_frames, masked)

    def describe(self, settings: Any) -> dict:
        return {k: v for part in self.parts for k, v in part.describe(settings).items()}


def method_names() -> list[str]:
    """Every registered method name (compositions of them with ``+`` are accepted too)."""
    return list(METHODS)


def get_method(name: str) -> EditMethod:
    """The method called ``name`` (``a+b``: a composition); ``ValueError`` in one line naming
    the choices, or the conflict, otherwise."""
    names = [n.strip() for n in str(name).split("+")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown editing method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if len(names) == 1:
        return METHODS[names[0]]
    if len(set(names)) != len(names):
        raise ValueError(f"method {name!r} names a method twice")
    parts = [METHODS[n] for n in names]
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            if a.roles & b.roles:
                both = ", ".join(sorted(a.roles & b.roles))
                raise ValueError(
                    f"methods {a.name} and {b.name} cannot be combined: both decide the {both}"
                )
    if SEQUENTIAL & set(names) and "cross_frame" in names:
        raise ValueError(
            f"method {name!r}: cross_frame needs the frames sampled together, and "
            f"{' / '.join(sorted(SEQUENTIAL & set(names)))} makes them one at a time"
        )
    return Composed(parts)


def resolve_method(model, name: str | None = None) -> EditMethod:
    """The method ``name`` (None: the model's default, its first) if ``model`` runs it (every
    part of a composition); ``ValueError`` saying which methods it runs otherwise."""
    runs = tuple(getattr(model, "methods", ()))
    if not runs:
        raise ValueError(f"{type(model).__name__} declares no editing methods (model.methods)")
    method = get_method(name or runs[0])
    for part in getattr(method, "parts", [method]):
        if part.name not in runs:
            raise ValueError(
                f"method {part.name!r} does not run on this {type(model).__name__}: it runs "
                f"{', '.join(runs)} ({part.needs})"
            )
    return method
