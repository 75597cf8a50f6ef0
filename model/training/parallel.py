"""Gen-1 on many devices: DDP with joint image + video batches, and FSDP's units.

**DDP.** An image batch runs the UNet with its temporal layers off, so their parameters
take no part in the loss, and DDP (with ``find_unused_parameters=False``) waits for their
gradients forever. Instead of searching the autograd graph for unused parameters on every
step (``find_unused_parameters=True``), or running the temporal branch with a zero gate
(its full cost for nothing), an image step ties them in: ``loss + 0 * sum(p.sum())`` costs
one read of those weights and gives each a zero gradient that DDP all-reduces. A zero
gradient is not no gradient: AdamW would still move the weight (momentum, weight decay), so
after the all-reduce (``drop_tied_gradients``) they are set back to None and the optimiser
skips them, as it does in one process. ``bench/gpu.py`` measures the three ways.

**FSDP.** ``trainer=fsdp`` wraps the whole ``Gen1`` module (:class:`Gen1FSDPStrategy`, a
Lightning ``FSDPStrategy``) with ``use_orig_params=True``, so parameters that do and do not
train may share a unit and training code keeps using ``self.unet`` ... by name. The frozen
VAE, MiDaS and CLIP are left out of the sharding (FSDP's ``ignored_modules``): replicated on
every device like under DDP, never gathered, their methods (``encode``, ``encode_image``,
not ``forward``, the only call FSDP gathers weights for) used as they are, and CLIP's scalar
``logit_scale``, which FSDP cannot shard, left alone. :func:`wrap_policy` makes
a unit of the UNet (its stem and head), of each of its blocks (an input, middle or output
``TimestepEmbedSequential``, gathered only while it runs) and of each temporal layer, so
with ``model.trainable=temporal`` the frozen spatial weights and the trained temporal ones
are sharded (and given gradients) apart, and a unit that does not run (temporal layers on
image batches) simply gets no gradient. The EMA copy is a UNet too: wrapped the same way,
its shards line up with the UNet's unit for unit, and the EMA update stays local to each
rank.
"""

from __future__ import annotations

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from model.nets.blocks import TimestepEmbedSequential
from model.nets.temporal import TemporalAttention, TemporalConv
from model.nets.unet import UNet

UNIT_CLASSES = (UNet, TimestepEmbedSequential, TemporalConv, TemporalAttention)
FROZEN_ENCODERS = ("vae", "clip", "depth")  # Gen1's attributes that never train


def wrap_policy() -> ModuleWrapPolicy:
    """The FSDP auto-wrap policy of a Gen-1 module: the UNet, its blocks, temporal layers."""
    return ModuleWrapPolicy(set(UNIT_CLASSES))


def frozen_encoders(model: nn.Module) -> list[nn.Module]:
    """The frozen encoders a model holds (none for modules without them)."""
    found = [getattr(model, name, None) for name in FROZEN_ENCODERS]
    return [m for m in found if isinstance(m, nn.Module)]


class Gen1FSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the model's frozen encoders left out of the sharding: moved to
    the device whole and kept out of FSDP's units (``ignored_modules``)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        frozen = frozen_encoders(model)
        if frozen:
            self.kwargs["ignored_modules"] = frozen
            for module in frozen:
                module.to(self.root_device)
        return super()._setup_model(model)


def clip_fsdp(module: nn.Module | None, max_norm: float | None) -> bool:
    """Clip the gradients' norm over every shard to ``max_norm`` if ``module`` is an FSDP
    root (what Lightning's FSDPStrategy trains; its own clipping refuses FSDP) and a norm is
    set; whether it did (if not, clip as usual)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(module, FullyShardedDataParallel) or not max_norm:
        return False
    module.clip_grad_norm_(max_norm)
    return True


def skipped_loss(device: torch.device | str) -> torch.Tensor:
    """The loss of a batch skipped without running the model (0, on ``device``): Lightning
    refuses None under DDP / FSDP, and a loss that reaches no parameter gives no gradient,
    no all-reduce and no optimiser step."""
    return torch.zeros((), device=device, requires_grad=True)


def tie(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """``loss`` unchanged, with every one of ``params`` in its graph (zero gradients)."""
    if not params:
        return loss
    return loss + 0.0 * torch.stack([p.sum() for p in params]).sum().to(loss.dtype)


def drop_tied_gradients(params: list[nn.Parameter]) -> None:
    """Forget the (all-reduced, zero) gradients of tied parameters: the optimiser skips them."""
    for p in params:
        p.grad = None
