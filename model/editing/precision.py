"""Precision and weight layout of the networks an edit runs: half-precision casts, autocast,
and oneDNN-prepacked weights for fp32 on the CPU."""

from __future__ import annotations

import contextlib

import torch

from model.editing.settings import EditSettings
from model.weights.prepack import prepacked_weights


def cast_for_inference(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating weights to ``dtype`` in place, except normalisation layers, which stay
    float32 (their statistics need it, and LDM's GroupNorm32 feeds them float32 inputs). Run
    the module under ``torch.autocast`` with the same dtype."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for layer in module.modules():
        if isinstance(layer, norms):
            continue
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
    return module


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for float32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inference_weights(settings: EditSettings, dtype: torch.dtype | None, *networks):
    """A context in which the networks an edit runs hold weights prepacked for oneDNN, when
    ``settings.prepack`` and they run in fp32 on the CPU (elsewhere a no-op)."""
    stack = contextlib.ExitStack()
    if settings.prepack and dtype is None:
        for net in {id(n): n for n in networks if n is not None}.values():
            stack.enter_context(prepacked_weights(net))
    return stack
