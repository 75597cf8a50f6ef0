"""Training a LoRA of an SD single file on a handful of images, written in kohya's format.

``LoraTrainer`` loads the base SD file (``model.sd.loading.load_sd``; frozen) and gives every
Linear and 1x1 Conv2d inside the UNet's transformer blocks (kohya's default targets for SD:
the modules of diffusers' ``Transformer2DModel``) a low-rank update through a weight
parametrisation, ``W + (alpha / r) * up @ down`` (``LoraWeight``; ``down`` kaiming-uniform,
``up`` zero, as kohya's ``LoRAModule`` initialises): the UNet trained *is* the merged UNet, so
the file written equals what ``model.sd.lora.merge_loras`` rebuilds (bit for bit, tested).
Every image is captioned with one fixed ``instance_prompt`` (DreamBooth-style), encoded once
by the frozen text encoder. The loss is SD's (``model.diffusion.loss``, eps or v, min-SNR).

``write_kohya_lora`` writes ``lora_unet_<diffusers path>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha`` with ``ss_*`` metadata as kohya's ``train_network.py`` does,
which A1111 and ComfyUI load. ``LoraExport`` (a Lightning callback) writes it at the end of
training (and with every checkpoint); ``release_lora`` (``release.py --format lora``) writes it
from a training checkpoint.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from model.diffusion.loss import training_loss
from model.nets.blocks import SpatialTransformer
from model.sd.diffusers_names import unet_names
from model.sd.loading import load_sd
from model.weights.atomic import atomic_output, file_sha256
from model.weights.checkpoint import CheckpointError
from model.weights.pickles import load_data_only
from model.weights.release import read_training_checkpoint


class LoraWeight(nn.Module):
    """The parametrisation ``W -> W + scale * up @ down`` of a Linear ``(out, in)`` or Conv2d
    ``(out, in, k, k)`` weight; ``down`` ``(r, in[, k, k])``, ``up`` ``(out, r[, 1, 1])``."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        out, inp = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        self.down = nn.Parameter(torch.empty(rank, inp, *kernel))
        self.up = nn.Parameter(torch.zeros(out, rank, *([1] * len(kernel))))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.alpha = float(alpha)

    def delta(self) -> torch.Tensor:
        """``up @ down`` in the weight's shape, float32 (as ``LoraPair.delta`` computes it)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return product.reshape(self.up.shape[0], *self.down.shape[1:])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta().reshape(weight.shape) * (self.alpha / self.down.shape[0])
        return (weight.float() + delta).to(weight.dtype)


def lora_targets(unet: nn.Module) -> dict[str, nn.Module]:
    """Our module name -> module of each Linear and 1x1 Conv2d inside the UNet's spatial
    transformers (temporal layers excluded): kohya's SD LoRA targets."""
    targets = {}
    for name, block in unet.named_modules():
        if not isinstance(block, SpatialTransformer):
            continue
        for sub, module in block.named_modules():
            if sub.startswith("temporal") or not sub:
                continue
            conv_1x1 = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            if isinstance(module, nn.Linear) or conv_1x1:
                targets[f"{name}.{sub}"] = module
    return targets


class LoraTrainer(pl.LightningModule):
    """A LoRA of ``base`` (an SD single file) trained on images captioned ``instance_prompt``.

    ``rank`` / ``alpha``: kohya's ``network_dim`` / ``network_alpha``. Batches are
    ``{"frames": (B, 1, 3, H, W) in [-1, 1]}`` (``data.datasets.ImageDataset``).
    """

    def __init__(
        self,
        base: str,
        instance_prompt: str,
        rank: int = 4,
        alpha: float = 4.0,
        lr: float = 1e-3,
        min_snr_gamma: float | None = 5.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if rank < 1:
            raise ValueError(f"model.rank must be >= 1, got {rank}")
        self.sd = load_sd(base)
        self.names = unet_names(self.sd.unet)
        self.adapted = list(lora_targets(self.sd.unet))
        for name in self.adapted:
            module = self.sd.unet.get_submodule(name)
            parametrize.register_parametrization(
                module, "weight", LoraWeight(module.weight, rank, alpha)
            )
        self.register_buffer("context", self.sd.text_encoder.encode([instance_prompt]).float())
        self.started = time.time()

    def lora_layers(self) -> dict[str, LoraWeight]:
        """Our module name -> its ``LoraWeight``."""
        unet = self.sd.unet
        return {n: unet.get_submodule(n).parametrizations.weight[0] for n in self.adapted}

    def train(self, mode: bool = True) -> LoraTrainer:
        super().train(mode)
        self.sd.eval()  # nothing of the base changes; dropout-free either way
        return self

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        gen = torch.Generator(self.device).manual_seed(
            self.hparams.seed * 1_000_003 + self.global_step
        )
        frames = batch["frames"].flatten(0, 1)
        with torch.no_grad():
            latents = self.sd.vae.encode(frames, True, gen)
        context = self.context.expand(latents.shape[0], -1, -1)
        result = training_loss(
            lambda x, t, context: self.sd.unet(x, t, context),
            latents,
            self.sd.schedule,
            self.sd.parameterization,
            {"context": context},
            min_snr_gamma=self.hparams.min_snr_gamma,
            generator=gen,
        )
        self.log("train/loss", result.loss, prog_bar=True, batch_size=latents.shape[0])
        return result.loss

    def configure_optimizers(self):
        params = [p for layer in self.lora_layers().values() for p in layer.parameters()]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=0.0)

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """The LoRA in kohya's keys: ``lora_unet_<diffusers path, _ for .>.lora_down.weight``,
        ``.lora_up.weight`` (float32) and ``.alpha``."""
        state = {}
        for name, layer in self.lora_layers().items():
            stem = "lora_unet_" + self.names[name].replace(".", "_")
            state[f"{stem}.lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            state[f"{stem}.lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            state[f"{stem}.alpha"] = torch.tensor(layer.alpha)
        return state

    def kohya_metadata(self, images: int | None = None, steps: int | None = None) -> dict[str, str]:
        """kohya ``train_network.py``'s ``ss_*`` metadata, where it means something here.
        ``images``: how many training images; ``steps``: the optimiser steps taken (default
        the Lightning module's ``global_step``)."""
        h = self.hparams
        config = self.sd.config
        version = "sd_v1" if config.text_kind == "sd1" else "sd_v2"
        size = 8 * int(config.image_size or 64)
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(h.rank),
            "ss_network_alpha": str(h.alpha),
            "ss_network_train_unet_only": "True",
            "ss_base_model_version": version,
            "ss_v2": str(config.text_kind == "sd2"),
            "ss_v_parameterization": str(config.parameterization == "v"),
            "ss_sd_model_name": Path(h.base).name,
            "ss_resolution": f"({size}, {size})",
            "ss_learning_rate": str(h.lr),
            "ss_unet_lr": str(h.lr),
            "ss_text_encoder_lr": "None",
            "ss_max_train_steps": str(self.trainer.max_steps if self._trainer else ""),
            "ss_steps": str(self.global_step if steps is None else steps),
            "ss_min_snr_gamma": str(h.min_snr_gamma),
            "ss_seed": str(h.seed),
            "ss_training_started_at": str(self.started),
            "ss_training_finished_at": str(time.time()),
            "ss_tag_frequency": json.dumps({"instance": {h.instance_prompt: images or 0}}),
            "ss_training_comment": f"instance prompt: {h.instance_prompt}",
            "modelspec.architecture": f"stable-diffusion-{version[3:]}/lora",
        }
        if images is not None:
            metadata["ss_num_train_images"] = str(images)
        return metadata


def write_kohya_lora(
    trainer: LoraTrainer, path: str | Path, images: int | None = None, steps: int | None = None
) -> Path:
    """Write ``trainer``'s LoRA as a kohya ``.safetensors`` (atomically) and return its path;
    ``images`` / ``steps`` go to the ``ss_*`` metadata (see ``LoraTrainer.kohya_metadata``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temp:
        metadata = trainer.kohya_metadata(images, steps)
        save_file(trainer.kohya_state(), str(temp), metadata=metadata)
    return path


LORA_KEY = ".parametrizations.weight.0."  # LoraWeight's parameters in a LoraTrainer state_dict


def release_lora(checkpoint: str | Path, output: str | Path) -> str:
    """A ``LoraTrainer`` checkpoint (``train.py experiment=tiny_lora``) -> its LoRA as a kohya
    ``.safetensors`` (float32 ``lora_down`` / ``lora_up``, ``alpha``, ``ss_*`` metadata: what
    ``LoraExport`` writes at that step), written atomically; returns the file's sha256.

    The base SD file the checkpoint names (``model.base``, as given to train.py: relative to
    the working directory) is read for the layers' diffusers names. Raises
    ``FileNotFoundError`` (the checkpoint or the base missing), ``CheckpointError`` for a
    checkpoint of another trainer or whose LoRA does not fit its base (the keys named), and
    ``ValueError`` if ``output`` is the checkpoint itself.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if output.resolve() == checkpoint.resolve():
        raise ValueError(f"the release would overwrite its checkpoint {checkpoint}")
    state, hparams = read_training_checkpoint(checkpoint)
    lora = {k: v for k, v in state.items() if LORA_KEY in k}
    if not lora or not {"base", "instance_prompt", "rank"} <= set(hparams):
        raise CheckpointError(f"{checkpoint}: not a LoraTrainer checkpoint (no LoRA layers)")
    if not Path(hparams["base"]).is_file():
        raise FileNotFoundError(
            f"{checkpoint}: its base SD file {hparams['base']} (model.base) not found"
        )
    known = inspect.signature(LoraTrainer).parameters
    trainer = LoraTrainer(**{k: v for k, v in hparams.items() if k in known})
    expected = {k for k in trainer.state_dict() if LORA_KEY in k}
    missing, unexpected = sorted(expected - set(lora)), sorted(set(lora) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint}: its LoRA does not fit {hparams['base']}: missing "
            f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'}"
        )
    try:
        trainer.load_state_dict(lora, strict=False)
    except RuntimeError as err:  # a shape that does not fit
        raise CheckpointError(
            f"{checkpoint}: its LoRA does not fit {hparams['base']}: {err}"
        ) from err
    write_kohya_lora(trainer, output, steps=_global_step(checkpoint))
    return file_sha256(output)


def _global_step(checkpoint: Path) -> int | None:
    """The ``global_step`` a Lightning checkpoint records (None if it has none)."""
    step = load_data_only(checkpoint).get("global_step")
    return int(step) if isinstance(step, int) else None


class LoraExport(pl.Callback):
    """Writes the LoRA (kohya format) to ``path`` with every checkpoint and at the end."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            dataset = getattr(trainer.datamodule, "train_dataset", None)
            images = len(dataset) if dataset is not None else None
            write_kohya_lora(module, self.path, images)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)
