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
        """Move every floating-point parameter and buffer toward ``model``'s.

        Parameters are read as the module holds them, never through ``state_dict`` (which
        under FSDP gathers every shard): a copy sharded like ``model`` (``model/training/
        parallel.py``) updates its local shard from ``model``'s.
        """
        ours, theirs = _floating(self.model), _floating(model)
        if [t.shape for t in ours] != [t.shape for t in theirs]:
            raise ValueError("the EMA copy and the model hold different parameters or shards")
        torch._foreach_lerp_(ours, theirs, 1.0 - self.current_decay())
        self.num_updates += 1


def _floating(module: nn.Module) -> list[torch.Tensor]:
    """A module's floating-point parameters and buffers, in registration order."""
    return [t.data for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
