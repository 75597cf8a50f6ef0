"""LoRA weights that change from frame to frame (a keyframed ``lora`` weight): added to the
layers' outputs with a weight per frame instead of merged into their weights.

A merged LoRA turns a layer's weight W into W + s dW for every input. A keyframed one needs
its own s for each frame, and the UNet sees the frames of a window, and the guidance
branches, as the rows of one batch ``(B F, ...)``. A layer is linear in its weight, so
``(W + s dW) x = W x + s (dW x)``: a forward hook adds ``s_row * layer(x; dW)`` to each
output row, which equals merging row by row (to float rounding) at one more product per
layer it touches. Only the UNet's layers take a weight per frame; a text-encoder part stays
merged at the edit's weight (prompts are encoded once per keyframe, not per frame).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.sd.lora import LoraFile, resolve_targets, scaled_delta
from model.sd.lora_names import unet_targets
from model.weights.checkpoint import CheckpointError


class FrameLoras:
    """LoRA files ``loras`` (their UNet parts) on ``unet``'s layers with a weight per batch
    row, set by ``rows(scale)`` around each UNet call: ``scale`` ``(rows, L)``, column l the
    weight of ``loras[l]``. The hooks are on from construction until ``remove()``; a call
    without ``rows`` raises ``RuntimeError`` (an unset weight would silently be 0).

    Raises ``CheckpointError`` (file and keys named) when a file's keys match no layer or a
    delta does not fit its layer, before any hook is installed.
    """

    def __init__(self, loras: Sequence[LoraFile], unet: nn.Module) -> None:
        tables = {"unet": unet_targets(unet), "text": None, "text2": None}
        deltas: dict[int, tuple[nn.Module, list[tuple[int, torch.Tensor]]]] = {}
        for index, lora in enumerate(loras):
            found, _ = resolve_targets(lora, tables, skip_text=True)
            for pair, target in found:
                weight = getattr(target.module, target.param)
                if target.rows is not None:  # a slice of a fused weight: UNets have none
                    raise CheckpointError(
                        f"{lora.path}: {pair.key}: per-frame weights need a whole layer"
                    )
                try:
                    delta = scaled_delta(pair, weight.shape)
                except CheckpointError as err:
                    raise CheckpointError(f"{lora.path}: {err}") from None
                module, held = deltas.setdefault(id(target.module), (target.module, []))
                held.append((index, delta.to(weight.device, weight.dtype)))
        self.count = len(loras)
        self.layers = len(deltas)
        self.scale: torch.Tensor | None = None
        self._handles = [
            module.register_forward_hook(self._hook_for(held)) for module, held in deltas.values()
        ]
        # Attention reading q, k, v as one concatenated weight would bypass their hooks.
        hooked = {id(module) for module, _ in deltas.values()}
        self._unfused = [
            m for m in unet.modules()
            if getattr(m, "fuse_qkv", False)
            and any(id(getattr(m, n)) in hooked for n in ("to_q", "to_k", "to_v"))
        ]  # fmt: skip
        for m in self._unfused:
            m.fuse_qkv = False

    @contextlib.contextmanager
    def rows(self, scale: torch.Tensor) -> Iterator[None]:
        """Within the block each row ``r`` of a UNet call runs with weights ``scale[r]``
        ``(rows, L)``."""
        if scale.ndim != 2 or scale.shape[1] != self.count:
            raise ValueError(
                f"LoRA weights per row must be (rows, {self.count}), got {tuple(scale.shape)}"
            )
        previous, self.scale = self.scale, scale
        try:
            yield
        finally:
            self.scale = previous

    def remove(self) -> None:
        """Take the hooks off and give attention its fused q, k, v back."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for m in self._unfused:
            m.fuse_qkv = True
        self._unfused.clear()

    def _hook_for(self, held: list[tuple[int, torch.Tensor]]):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.scale is None:
                raise RuntimeError("a keyframed LoRA layer ran outside FrameLoras.rows()")
            x = inputs[0]
            if x.shape[0] != self.scale.shape[0]:
                raise ValueError(
                    f"LoRA weights for {self.scale.shape[0]} rows, but a layer got {x.shape[0]}"
                )
            for index, delta in held:
                if isinstance(module, nn.Conv2d):
                    extra = F.conv2d(x, delta.to(x.dtype), None, module.stride, module.padding,
                                     module.dilation, module.groups)  # fmt: skip
                else:
                    extra = F.linear(x, delta.to(x.dtype))
                weight = self.scale[:, index].to(extra).view(-1, *[1] * (extra.ndim - 1))
                output = output + weight * extra
            return output

        return hook


def frame_lora_rows(frame_loras: FrameLoras | None, lora_scale: torch.Tensor | None):
    """The context a model's UNet call runs in: ``frame_loras.rows`` with the per-frame LoRA
    weights ``lora_scale`` ``(B, F, L, 1, 1)`` of a video ``(B, F, C, h, w)`` laid out as the
    UNet's rows ``(B F, L)``; nothing to do without them. ``ValueError`` when weights
    are given to a model with no keyframed LoRA."""
    if lora_scale is None:
        return contextlib.nullcontext()
    if frame_loras is None:
        raise ValueError("per-frame LoRA weights given, but the model has no keyframed LoRA")
    return frame_loras.rows(lora_scale.flatten(0, 1).flatten(1).float())
