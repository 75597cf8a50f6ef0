"""Weights prepacked for oneDNN: faster fp32 inference on the CPU, where it is faster.

A plain ``nn.Conv2d`` on the CPU hands oneDNN its weight in PyTorch's layout, and oneDNN
copies it into its blocked layout on every call; where SD's UNet runs 1280-channel 3x3
convolutions on 8x8 or 4x4 latents that copy costs more than the convolution itself.
:func:`prepacked_weights` converts each weight once, for the input shape the layer is first
called with, holds it in place of the plain one for the duration, and restores the plain
weight bit for bit on exit. The shape matters: oneDNN picks the blocked layout for a shape,
and a weight packed for another one is converted again inside every call (10-20x slower
than plain for SD's 1920-channel convolutions on AVX2); a layer called with a new shape is
repacked for it.

Whether packing wins depends on the layer, its input and the CPU (linear layers gain little
on AVX2, 1x1 convolutions rarely): with a ``calibration`` (``model.weights.calibration``)
each layer is timed plain and packed on its first input and keeps the faster; without, every
eligible layer is packed. ``bench/unet.py`` measures both. The freezing pass of
``torch.compile`` prepacks the same way.
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


def _eligible(layer: nn.Module, one_by_one: bool) -> bool:
    """fp32 CPU Linear, and Conv2d (1x1 only when ``one_by_one``: PyTorch's own 1x1 path is
    usually faster), whose forward is the stock one: a subclass that reads ``weight`` itself
    (timm's Conv2dSame) would see the emptied tensor."""
    if type(layer).forward is nn.Conv2d.forward:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return False
        if layer.kernel_size == (1, 1) and not one_by_one:
            return False
    elif type(layer).forward is not nn.Linear.forward:
        return False
    if {"_conv_forward", "forward"} & set(layer.__dict__):  # an enclosing context's
        return False
    return layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32


def _read_directly(module: nn.Module, fused: bool) -> set[int]:
    """Layers whose weights their parent reads itself: ``nn.MultiheadAttention``'s, and with
    ``fused`` the q, k, v projections of modules that concatenate them (``fuse_qkv``)."""
    skip = set()
    for parent in module.modules():
        if isinstance(parent, nn.MultiheadAttention):
            skip.update(id(layer) for layer in parent.modules())
        elif fused and getattr(parent, "fuse_qkv", False):
            skip.update(id(getattr(parent, name)) for name in ("to_q", "to_k", "to_v"))
    return skip


def layer_key(
    layer: nn.Module, shape: tuple[int, ...], weight_shape: tuple[int, ...] | None = None
) -> str:
    """What decides whether packing ``layer`` pays: its kind, weight shape (``weight_shape``
    where the layer holds only its packed weight for now), stride, padding, dilation and
    groups, and its input shape (fp32)."""
    weight = "x".join(map(str, weight_shape or layer.weight.shape))
    size = "x".join(map(str, shape))
    if isinstance(layer, nn.Conv2d):
        padding, stride, dilation, groups = _conv_args(layer)
        return f"conv2d {weight} s{stride} p{padding} d{dilation} g{groups} on {size}"
    return f"linear {weight} bias={layer.bias is not None} on {size}"


def _conv_args(conv: nn.Conv2d) -> list:
    return [list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups]


def _check_inference(x: torch.Tensor, bias: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("prepacked weights are for inference: run under torch.no_grad()")


class _Packing:
    """One layer while prepacked: the packed weight (None while the plain one is held), the
    input shape the current choice was made for, and whether packing won for it."""

    def __init__(self, layer: nn.Module, calibration=None) -> None:
        self.layer = layer
        self.weight_shape = tuple(layer.weight.shape)  # the plain one's: packed, it is empty
        self.conv = isinstance(layer, nn.Conv2d)
        self.calibration = calibration
        self.packed: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None
        self.use_packed = False

    def pack(self, shape: tuple[int, ...]) -> None:
        """Hold the weight packed for inputs of ``shape`` (the plain one stays held too)."""
        weight = self.plain_weight().detach().contiguous().to_mkldnn()
        if self.conv:
            weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight, *_conv_args(self.layer), list(shape)
            )
        self.packed = weight

    def plain_weight(self) -> torch.Tensor:
        """The plain weight, held again if only the packed one was."""
        if self.layer.weight.numel() == 0:
            self.layer.weight.data = self.packed.to_dense()
        return self.layer.weight

    def drop(self, packed: bool) -> None:
        """Let go of the packed weight (``packed``) or of the plain one."""
        if packed:
            self.plain_weight()
            self.packed = None
        else:
            self.layer.weight.data = torch.empty(0)

    def restore(self) -> None:
        """The plain weight back in the layer, as it was (a layout conversion is exact)."""
        if self.packed is not None:
            self.drop(packed=True)

    def run_plain(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.conv:
            return F.conv2d(
                x, self.plain_weight(), layer.bias, layer.stride, layer.padding,
                layer.dilation, layer.groups,
            )  # fmt: skip
        return F.linear(x, self.plain_weight(), layer.bias)

    def run_packed(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.packed, self.layer.bias, *_conv_args(self.layer), "none", [], ""
            )
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.layer.bias, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_inference(x, self.layer.bias)
        if x.dtype != torch.float32 or x.device.type != "cpu":  # under autocast, say
            layer, weight = self.layer, self.layer.weight
            weight = (weight if weight.numel() else self.packed.to_dense()).to(x)
            if self.conv:
                args = (layer.stride, layer.padding, layer.dilation, layer.groups)
                return F.conv2d(x, weight, layer.bias, *args)
            return F.linear(x, weight, layer.bias)
        if tuple(x.shape) != self.shape:
            return self.first_call(x)
        if self.calibration is not None and self.calibration.pending:
            self.calibration.flush()  # a layer called again: the network's first call is over
        return self.run_packed(x) if self.use_packed else self.run_plain(x)

    def first_call(self, x: torch.Tensor) -> torch.Tensor:
        """The output for a new input shape, deciding (timing, under calibration) and packing."""
        shape = tuple(x.shape)
        self.shape = shape
        if self.calibration is None:
            decision = True
        else:
            decision = self.calibration.decided(layer_key(self.layer, shape, self.weight_shape))
        if decision is None:
            return self.calibrate(x)
        self.use_packed = decision
        if decision:
            self.pack(shape)  # repacked, when packed for another shape before
            self.drop(packed=False)
            return self.run_packed(x)
        self.restore()
        return self.run_plain(x)

    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Time both on ``x`` and keep the faster; the output is the faster's. Packed runs
        first, so one-off costs (oneDNN's first call in a process) count against packing;
        when the two are within 25%, both run again, interleaved, and the better times count."""
        self.restore()
        self.pack(tuple(x.shape))
        clock = self.calibration.clock
        times = {True: [], False: []}
        outputs = {}
        for _ in range(2):
            for packed in (True, False):
                start = clock()
                outputs[packed] = (self.run_packed if packed else self.run_plain)(x)
                times[packed].append(clock() - start)
            plain_s, packed_s = min(times[False]), min(times[True])
            if not 0.8 < packed_s / max(plain_s, 1e-12) < 1.25:
                break
        spent_s = sum(map(sum, times.values()))
        key = layer_key(self.layer, tuple(x.shape), self.weight_shape)
        self.use_packed = self.calibration.record(key, plain_s, packed_s, spent_s)
        self.drop(packed=not self.use_packed)
        return outputs[self.use_packed]


def _install(packing: _Packing) -> None:
    layer = packing.layer
    if packing.conv:
        layer._conv_forward = lambda x, weight, bias: packing(x)
    else:
        layer.forward = packing


def _uninstall(packing: _Packing) -> None:
    packing.restore()
    weight = packing.layer.weight
    if weight.is_inference():  # restored or emptied in inference mode: a normal tensor again
        weight.data = weight.data.clone()
    del packing.layer.__dict__["_conv_forward" if packing.conv else "forward"]


@contextlib.contextmanager
def prepacked_weights(module: nn.Module, calibration=None) -> Iterator[int]:
    """Within the context, the fp32 CPU ``nn.Linear`` and ``nn.Conv2d`` layers of ``module``
    run on weights prepacked for oneDNN, each packed for the input shape it is first called
    with; yields how many layers take part (0 where oneDNN is missing).

    Without ``calibration`` every eligible layer is packed (not 1x1 convolutions), and modules
    with a ``fuse_qkv`` switch (``model.nets.attention.Attention``), which read their plain
    q, k, v weights, have it off for the duration. With a ``calibration`` (an object with
    ``clock``, ``decided(key)``, ``record(key, plain_s, packed_s, spent_s)``, ``pending`` and
    ``flush()``, as ``model.weights.calibration.Calibration``) each layer, 1x1 convolutions
    included, keeps the plain or the packed weight, whichever it decides; fused q, k, v stay
    fused and plain.

    Inference only: plain weights that were packed are set aside (emptied, so memory is not
    doubled) and restored exactly on exit, so do not save, train or move ``module`` inside the
    context.
    """
    if not available():
        yield 0
        return
    calibrated = calibration is not None
    installed: list[_Packing] = []
    unfused = [] if calibrated else [m for m in module.modules() if getattr(m, "fuse_qkv", False)]
    try:
        for m in unfused:
            m.fuse_qkv = False
        skip = _read_directly(module, fused=calibrated)
        for layer in module.modules():
            if id(layer) in skip or not _eligible(layer, one_by_one=calibrated):
                continue
            packing = _Packing(layer, calibration)
            _install(packing)
            installed.append(packing)
        yield len(installed)
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for packing in installed:
                _uninstall(packing)
        for m in unfused:
            del m.fuse_qkv  # back to the class default
        if calibrated and calibration.pending:
            calibration.flush()
