"""Exponential moving average of a module's weights, kept as a module so it checkpoints."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of ``model`` whose parameters trail the model's: ``e <- e + (1-d)(p - e)``.

    Held as a submodule (``ema.model.*`` keys), so it is saved, resumed and released with
    the training checkpoint like any other weight.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EMA:
        """Stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every floating-point parameter and buffer toward ``model``'s."""
        ours = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        theirs = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(ours, theirs, 1.0 - self.decay)
