"""Weights prepacked for oneDNN: faster fp32 inference on the CPU.

A plain ``nn.Conv2d`` on the CPU hands oneDNN its weight in PyTorch's layout, and oneDNN
copies it into its blocked layout on every call; where SD's UNet runs 1280-channel 3x3
convolutions on 8x8 or 4x4 latents that copy costs as much as the convolution itself.
Linear layers gain less, from oneDNN's matrix product on a oneDNN-held weight.
:func:`prepacked_weights` converts each weight once, holds it in place of the plain one for
the duration, and restores the plain weight bit for bit on exit (``bench/unet.py``
measures the gain). The freezing pass of ``torch.compile`` prepacks the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    """Whether this PyTorch build has the oneDNN operators that prepacking needs."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_convolution_pointwise")
        and hasattr(ops, "_linear_pointwise")
    )


def _eligible(layer: nn.Module) -> bool:
    """fp32 CPU Linear, and Conv2d other than 1x1 (PyTorch's own 1x1 path is faster), whose
    forward is the stock one: a subclass that reads ``weight`` itself (timm's Conv2dSame)
    would see the emptied tensor."""
    if type(layer).forward is nn.Conv2d.forward:
        if layer.kernel_size == (1, 1) or layer.padding_mode != "zeros":
            return False
        if isinstance(layer.padding, str):
            return False
    elif type(layer).forward is not nn.Linear.forward:
        return False
    weight = layer.weight
    packed_already = weight.numel() == 0  # by an enclosing prepacked_weights
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and not packed_already


def _read_directly(module: nn.Module) -> set[int]:
    """Layers whose weights their parent reads itself (``nn.MultiheadAttention``'s)."""
    return {
        id(layer)
        for parent in module.modules()
        if isinstance(parent, nn.MultiheadAttention)
        for layer in parent.modules()
    }


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _pack(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach().contiguous().to_mkldnn()
    if isinstance(layer, nn.Conv2d):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight, *_conv_args(layer))
    return weight


def _check_inference(x: torch.Tensor, bias: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("prepacked weights are for inference: run under torch.no_grad()")


def _conv_forward(conv: nn.Conv2d, packed: torch.Tensor):
    """A ``_conv_forward`` for ``conv`` (``nn.Conv2d.forward`` calls it) on ``packed``."""

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        _check_inference(x, bias)
        if x.dtype != torch.float32 or x.device.type != "cpu":  # under autocast, say
            weight = packed.to_dense().to(x)
            return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, *_conv_args(conv), "none", [], ""
        )

    return forward


def _linear_forward(linear: nn.Linear, packed: torch.Tensor):
    """A ``forward`` for ``linear`` on ``packed``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        _check_inference(x, linear.bias)
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, packed.to_dense().to(x), linear.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")

    return forward


@contextlib.contextmanager
def prepacked_weights(module: nn.Module) -> Iterator[int]:
    """Within the context, the fp32 CPU ``nn.Linear`` and ``nn.Conv2d`` layers of ``module``
    run on weights prepacked for oneDNN; yields how many (0 where oneDNN is missing).

    Inference only: the plain weights are set aside (emptied, so memory is not doubled) and
    restored exactly on exit, so do not save, train or move ``module`` inside the context.
    Modules with a ``fuse_qkv`` switch (``model.nets.attention.Attention``) read their plain
    q, k, v weights, so it is off for the duration.
    """
    if not available():
        yield 0
        return
    packed: list[tuple[nn.Module, torch.Tensor]] = []
    unfused = [m for m in module.modules() if getattr(m, "fuse_qkv", False)]
    try:
        for m in unfused:
            m.fuse_qkv = False
        skip = _read_directly(module)
        with torch.no_grad():
            for layer in module.modules():
                if id(layer) in skip or not _eligible(layer):
                    continue
                weights = _pack(layer)
                if isinstance(layer, nn.Conv2d):
                    layer._conv_forward = _conv_forward(layer, weights)
                else:
                    layer.forward = _linear_forward(layer, weights)
                packed.append((layer, weights))
                layer.weight.data = torch.empty(0)
        yield len(packed)
    finally:
        with torch.no_grad():
            for layer, weights in packed:
                layer.weight.data = weights.to_dense()
                del layer.__dict__["_conv_forward" if isinstance(layer, nn.Conv2d) else "forward"]
        for m in unfused:
            del m.fuse_qkv  # back to the class default
