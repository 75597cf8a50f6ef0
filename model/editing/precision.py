"""Precision and weight layout of the networks an edit runs: half-precision casts, autocast,
and oneDNN-prepacked weights for fp32 on the CPU."""

from __future__ import annotations

import contextlib

import torch

from model.editing.settings import EditSettings
from model.weights.calibration import Calibration
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


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Elsewhere bf16 is
    emulated: SD 1.5's UNet ran 47x slower than in fp32 on an AVX2 EPYC (README)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for float32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inference_weights(settings: EditSettings, dtype: torch.dtype | None, *networks):
    """A context in which the networks an edit runs hold weights prepacked for oneDNN where
    they run in fp32 on the CPU (elsewhere a no-op): every layer with ``settings.prepack``
    True, the layers measured faster so on this machine with "auto" (calibrated on their
    first input, cached per machine: ``model.weights.calibration``), none with False."""
    stack = contextlib.ExitStack()
    if settings.prepack is False or dtype is not None:
        return stack
    for net in {id(n): n for n in networks if n is not None}.values():
        calibration = Calibration(type(net).__name__) if settings.prepack == "auto" else None
        stack.enter_context(prepacked_weights(net, calibration))
    return stack
