"""How frames fold into a UNet's batch, and what may cross between them: the temporal layers
(Gen-1's video UNet) and cross-frame attention anchors (the training-free methods)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Frames:
    """How a spatial batch ``(b f)`` folds into clips, and what crosses frames in it.

    ``temporal``: whether the temporal layers run. ``gate`` is None when every clip runs them,
    else a float tensor of shape ``(b f, 1, 1, 1)``: 1 for frames of clips that do, 0 for
    frames of clips that do not (one batched call can then hold the image model's and the
    video model's branches). ``anchors``, a long tensor ``(count, A)``, turns the spatial
    self-attention into cross-frame attention: frame k's queries attend to the keys and values
    of frames ``anchors[k]`` of its clip instead of its own (Text2Video-Zero: the first frame;
    Tune-A-Video's sparse-causal and Rerender-A-Video's: the first and the previous).
    """

    count: int
    gate: torch.Tensor | None = None
    temporal: bool = True
    anchors: torch.Tensor | None = None

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x + delta`` where the temporal layers are on, ``x`` where they are off."""
        return x + delta if self.gate is None else x + delta * self.gate
