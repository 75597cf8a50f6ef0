"""Editing methods: how the frames of an edit are made consistent, by name.

A method decides the starting noise of the frames and the guided denoiser the sampler runs;
everything else (conditioning, SDEdit ``strength``, masks, samplers, decoding) is the
pipeline's (``model.editing.pipeline``) and the same for every method. A model lists the
methods it runs in ``model.methods``, its default first: a Gen-1 video model
``("gen1", "mov2mov")``, an SD checkpoint ``("mov2mov",)``.

- ``gen1``: the video model over overlapping temporal windows with Gen-1's guidance
  (``w``, ``w_t``) and PYoCo-mixed noise (``noise_correlation``);
- ``mov2mov``: every frame through the image model on its own (img2img at ``strength``),
  classifier-free guidance ``w``, one noise draw shared by every frame.
"""

from __future__ import annotations

from model.editing.methods.base import EditMethod
from model.editing.methods.gen1 import Gen1Method
from model.editing.methods.mov2mov import Mov2Mov

METHODS: dict[str, EditMethod] = {m.name: m for m in (Gen1Method(), Mov2Mov())}


def method_names() -> list[str]:
    """Every registered method name."""
    return list(METHODS)


def get_method(name: str) -> EditMethod:
    """The method called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown editing method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def resolve_method(model, name: str | None = None) -> EditMethod:
    """The method ``name`` (None: the model's default, its first) if ``model`` runs it;
    ``ValueError`` saying which methods it runs otherwise."""
    runs = tuple(getattr(model, "methods", ()))
    if not runs:
        raise ValueError(f"{type(model).__name__} declares no editing methods (model.methods)")
    method = get_method(name or runs[0])
    if method.name not in runs:
        raise ValueError(
            f"method {method.name!r} does not run on this {type(model).__name__}: it runs "
            f"{', '.join(runs)} ({method.needs})"
        )
    return method
