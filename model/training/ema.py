"""Exponential moving average of a module's weights, kept as a module so it checkpoints."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of ``model`` whose parameters trail the model's: ``e <- e + (1-d)(p - e)``.

    Held as a submodule (``ema.model.*`` keys), so it is saved, resumed and released with
    the training checkpoint like any other weight. With ``warmup`` the decay of update n is
    ``min(decay, (1 + n) / (10 + n))`` (LDM's LitEma), so a short run's average is not
    dominated by the initial weights; the update count is a buffer and resumes with them.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    def train(self, mode: bool = True) -> EMA:
        """Stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every floating-point parameter and buffer toward ``model``'s."""
        ours = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        theirs = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(ours, theirs, 1.0 - self.current_decay())
        self.num_updates += 1
