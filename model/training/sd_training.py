"""Training a small text-to-image Stable Diffusion, keyed as SD's own checkpoints.

``SDTrainer`` holds its parts under LDM's attribute names, so its Lightning ``state_dict`` *is*
an SD ``.ckpt``: ``model.diffusion_model.*`` (the UNet), ``first_stage_model.*`` (the frozen
VAE), ``cond_stage_model.model.*`` (the frozen SD 2.x-style text tower of an open_clip CLIP)
and ``model_ema.*`` (LDM's ``LitEma`` copies: dotless names, ``decay``, ``num_updates``).
``model.sd.loading.load_sd`` therefore reads a training checkpoint with ``use_ema`` as it
reads any SD file, and ``release_sd`` writes the single-file release plus its ``.yaml``.

A step: latents from the VAE posterior (or a cache of its moments, ``data.encoded``), the
caption's hidden states through the frozen text tower (the empty caption with probability
``p_uncond``, SD's dropout for classifier-free guidance), the diffusion loss
(``model.diffusion.loss``) on eps or v.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from model.diffusion.loss import training_loss
from model.encoders.text import SD2_PREFIX
from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.sd.components import load_text
from model.sd.config import SDConfig
from model.sd.files import write_sd_checkpoint
from model.weights.checkpoint import CheckpointError, load_sd_vae, read_state_dict
from model.weights.release import read_training_checkpoint

log = logging.getLogger(__name__)


class LitEma(nn.Module):
    """LDM's ``LitEma``: an EMA of a module's trainable parameters held as buffers named by
    the parameter path without dots (``diffusion_modelinput_blocks00weight``), with ``decay``
    and ``num_updates``; the decay of update n is ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.names = {n: n.replace(".", "") for n, p in model.named_parameters() if p.requires_grad}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))
        for name, param in model.named_parameters():
            if name in self.names:
                self.register_buffer(self.names[name], param.detach().clone())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every copy toward the model's parameter."""
        self.num_updates += 1
        n = int(self.num_updates)
        decay = min(float(self.decay), (1 + n) / (10 + n))
        params = dict(model.named_parameters())
        ours = [getattr(self, short) for short in self.names.values()]
        theirs = [params[name].detach() for name in self.names]
        torch._foreach_lerp_(ours, theirs, 1.0 - decay)


class SDTrainer(pl.LightningModule):
    """A text-to-image latent diffusion model (UNet trained; VAE and text tower frozen).

    ``unet``: ``UNet`` keyword arguments (``context_dim`` = the text tower's width);
    ``vae``: ``AutoencoderKL`` arguments with ``scale_factor``; ``text``: ``{arch, layer}`` of
    the text tower (open_clip arch; ``layer`` "last" or "penultimate", as SD 2.x's
    ``FrozenOpenCLIPEmbedder``); ``weights``: ``{vae, clip}`` files (the VAE's and the
    open_clip CLIP whose text tower conditions). ``image_size`` is the latent side trained at
    (the release's yaml records it).
    """

    def __init__(
        self,
        unet: dict,
        vae: dict,
        text: dict,
        weights: dict,
        parameterization: str = "eps",
        schedule: dict | None = None,
        image_size: int = 16,
        p_uncond: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        ema_decay: float = 0.999,
        min_snr_gamma: float | None = 5.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sd_config = sd_config_of(self.hparams)
        self.model = nn.Module()  # LDM's DiffusionWrapper: keys model.diffusion_model.*
        self.model.diffusion_model = UNet(**self.sd_config.unet)
        vae_params = {k: v for k, v in vae.items() if k not in ("_target_", "scale_factor")}
        self.first_stage_model = AutoencoderKL(**vae_params, scale_factor=vae["scale_factor"])
        log.info("%s", load_sd_vae(self.first_stage_model, weights["vae"]))
        self.first_stage_model.eval().requires_grad_(False)
        # the open_clip file's text tower, keyed as SD 2.x keys it (its visual.* tower dropped)
        clip_state = {
            SD2_PREFIX + k: v
            for k, v in read_state_dict(weights["clip"]).items()
            if not k.startswith("visual.")
        }
        self.cond_stage_model = nn.Module()  # FrozenOpenCLIPEmbedder: keys cond_stage_model.model.*
        self.cond_stage_model.model = load_text(self.sd_config, clip_state, weights["clip"])
        self.model_ema = LitEma(self.model, ema_decay)
        self.schedule = self.sd_config.schedule()
        self._captions: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> SDTrainer:
        """Only the UNet trains; the VAE and the text tower stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        return self

    @torch.no_grad()
    def text_context(self, captions: list[str]) -> torch.Tensor:
        """Hidden states ``(B, 77, D)`` of captions, each computed once and kept (the tower
        is frozen and a dataset's captions repeat)."""
        new = sorted({c for c in captions if c not in self._captions})
        if new:
            hidden = self.cond_stage_model.model.encode(new).float().cpu()
            self._captions.update(zip(new, hidden, strict=True))
        return torch.stack([self._captions[c] for c in captions]).to(self.device)

    def step_generator(self, offset: int = 0) -> torch.Generator:
        """A step's randomness as a function of seed and step (resumes exactly)."""
        seed = (self.hparams.seed * 1_000_003 + self.global_rank) * 1_000_003
        return torch.Generator(self.device).manual_seed(seed + self.global_step + offset)

    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        """The diffusion loss of a batch of single frames (or clips, flattened to images)."""
        frames = batch["frames"]
        b, f = frames.shape[:2]
        with torch.no_grad():
            if "latent_mean" in batch:  # a cache of encoded frames (data.encoded)
                mean, logvar = batch["latent_mean"].flatten(0, 1), batch["latent_logvar"]
                latents = self.first_stage_model.scaled_latents(mean, logvar.flatten(0, 1), gen)
            else:
                latents = self.first_stage_model.encode(frames.flatten(0, 1), True, gen)
            drop = torch.rand(b, generator=gen, device=gen.device) < self.hparams.p_uncond
            captions = [
                "" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)
            ]
            context = self.text_context(captions).repeat_interleave(f, dim=0)
        result = training_loss(
            lambda x, t, context: self.model.diffusion_model(x, t, context),
            latents,
            self.schedule,
            self.hparams.parameterization,
            {"context": context},
            min_snr_gamma=self.hparams.min_snr_gamma,
            generator=gen,
        )
        return result.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.step_generator())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["frames"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model_ema.update(self.model)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out loss of the EMA weights, from noise and timesteps fixed per batch."""
        gen = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
        with self.ema_weights():
            loss = self.loss(batch, gen)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["frames"].shape[0])

    def ema_weights(self):
        """A context in which the UNet holds its EMA weights (restored after)."""
        return _Swapped(self)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class _Swapped:
    """Swap the trainer's UNet parameters with their EMA copies for a block."""

    def __init__(self, trainer: SDTrainer) -> None:
        self.trainer = trainer

    def _swap(self) -> None:
        ema = self.trainer.model_ema
        params = dict(self.trainer.model.named_parameters())
        with torch.no_grad():
            for name, short in ema.names.items():
                copy = getattr(ema, short)
                held = params[name].detach().clone()
                params[name].copy_(copy)
                copy.copy_(held)

    def __enter__(self) -> SDTrainer:
        self._swap()
        return self.trainer

    def __exit__(self, *exc) -> None:
        self._swap()


def sd_config_of(hparams: dict[str, Any]) -> SDConfig:
    """The :class:`SDConfig` (inference yaml facts) of an ``SDTrainer``'s hyper-parameters."""
    unet = {k: v for k, v in dict(hparams["unet"]).items() if k != "_target_"}
    vae = {k: v for k, v in dict(hparams["vae"]).items() if k != "_target_"}
    text = dict(hparams["text"])
    schedule = dict(hparams.get("schedule") or {})
    layer = text.get("layer", "penultimate")
    if layer not in ("last", "penultimate"):
        raise ValueError(f"model.text.layer must be 'last' or 'penultimate', got {layer!r}")
    return SDConfig(
        unet={**unet, "use_checkpoint": False},
        vae={"embed_dim": vae["embed_dim"], "ddconfig": dict(vae["ddconfig"])},
        text_kind="sd2",
        text_arch=text.get("arch"),
        clip_skip=1 if layer == "last" else 2,
        parameterization=hparams.get("parameterization", "eps"),
        scale_factor=float(vae.get("scale_factor", 1.0)),
        num_timesteps=int(schedule.get("num_timesteps", 1000)),
        linear_start=float(schedule.get("beta_start", 0.00085)),
        linear_end=float(schedule.get("beta_end", 0.012)),
        image_size=int(hparams.get("image_size", 16)),
        source="SDTrainer hyper-parameters",
    )


def release_sd(checkpoint: str | Path, output: str | Path, use_ema: bool = True) -> str:
    """An ``SDTrainer`` checkpoint -> a single-file SD release (fp16, LDM keys: the EMA UNet as
    ``model.diffusion_model.*``, the VAE, the text tower) and its inference ``.yaml`` beside
    it (same stem). Returns the file's sha256."""
    checkpoint, output = Path(checkpoint), Path(output)
    if output.resolve() == checkpoint.resolve():
        raise ValueError(f"the release would overwrite its checkpoint {checkpoint}")
    state, hparams = read_training_checkpoint(checkpoint)
    if "text" not in hparams or "unet" not in hparams:
        raise CheckpointError(f"{checkpoint}: not an SDTrainer checkpoint (no unet / text)")
    config = sd_config_of(hparams)
    prefix = "model.diffusion_model."
    if use_ema:
        ema = {k: v for k, v in state.items() if k.startswith("model_ema.")}
        unet = {k: ema["model_ema." + ("diffusion_model." + k[len(prefix) :]).replace(".", "")]
                for k in state if k.startswith(prefix)}  # fmt: skip
    else:
        unet = {k: v for k, v in state.items() if k.startswith(prefix)}
    keep = ("first_stage_model.", "cond_stage_model.")
    tensors = {**unet, **{k: v for k, v in state.items() if k.startswith(keep)}}
    metadata = {"source_checkpoint": checkpoint.name, "ema": str(use_ema).lower()}
    return write_sd_checkpoint(tensors, config, output, metadata=metadata)
