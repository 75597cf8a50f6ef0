"""Training a ControlNet for an SD checkpoint, with ControlNet's own recipe.

Zhang, Rao & Agrawala 2023: the SD model is frozen; the control copy (``model.nets.controlnet``)
starts from the UNet's encoder weights (``time_embed``, ``input_blocks``, ``middle_block``),
its hint embedding random except the last convolution, every zero convolution at zero, so
the first step computes exactly the frozen SD; prompts are dropped to "" half the time
(``p_uncond`` 0.5) so the control learns to carry the structure on its own. Only the
ControlNet trains, on the diffusion loss of the frozen UNet with its residuals added.

The hint here is depth: the frozen MiDaS of the frame as the depth ControlNets take it
(``model.encoders.hints.depth_hint``), so the released file edits with ``hint: depth`` and
the same MiDaS at inference. ``ControlNetTrainer``'s ``state_dict`` holds the ControlNet as
``control_model.*`` (cldm's name) and its EMA copies as ``control_ema.*``;
``release_controlnet`` writes the original-layout file users load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from model.diffusion.loss import training_loss
from model.encoders.frozen import build_depth
from model.encoders.hints import depth_hint
from model.nets.controlnet import HINT_CHANNELS, ControlNet
from model.sd.controlnet import ORIGINAL_PREFIX
from model.sd.loading import load_sd
from model.training.sd_training import LitEma
from model.weights.atomic import file_sha256, save_safetensors
from model.weights.checkpoint import CheckpointError
from model.weights.release import read_training_checkpoint

log = logging.getLogger(__name__)


class ControlNetTrainer(pl.LightningModule):
    """A depth ControlNet for the SD single file ``base`` (frozen), hinted by the MiDaS
    ``depth`` (``{name, weights}``). ``hint_widths``: the hint embedding's widths (their count
    must give the VAE's downsampling factor: ``2 ** (len - 1)``)."""

    def __init__(
        self,
        base: str,
        depth: dict,
        hint_widths: tuple[int, ...] = HINT_CHANNELS,
        p_uncond: float = 0.5,
        lr: float = 1e-4,
        warmup_steps: int = 50,
        ema_decay: float = 0.999,
        min_snr_gamma: float | None = 5.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        sd = load_sd(base)
        if 2 ** (len(hint_widths) - 1) != sd.config.downsample_factor:
            raise ValueError(
                f"hint_widths {list(hint_widths)} downsample by {2 ** (len(hint_widths) - 1)}, "
                f"but {base}'s VAE by {sd.config.downsample_factor}"
            )
        self.sd = [sd]  # a list: frozen, not a submodule, so not in the checkpoint
        self.depth = [build_depth(dict(depth))]
        self.control_model = ControlNet(hint_widths=tuple(hint_widths), **sd.config.unet)
        encoder = {
            k: v for k, v in sd.unet.state_dict().items() if k in self.control_model.state_dict()
        }
        missing = self.control_model.load_state_dict(encoder, strict=False).missing_keys
        if any(
            not k.startswith(("input_hint_block", "zero_convs", "middle_block_out"))
            for k in missing
        ):
            raise CheckpointError(f"{base}: the UNet's encoder does not fit the ControlNet")
        self.control_ema = LitEma(self.control_model, ema_decay)
        self._captions: dict[str, torch.Tensor] = {}

    def setup(self, stage: str) -> None:
        self.sd[0].to(self.device)
        self.depth[0].to(self.device)

    @torch.no_grad()
    def text_context(self, captions: list[str]) -> torch.Tensor:
        """Hidden states ``(B, 77, D)`` of captions through the base's text encoder (cached)."""
        new = sorted({c for c in captions if c not in self._captions})
        if new:
            hidden = self.sd[0].text_encoder.encode(new).float().cpu()
            self._captions.update(zip(new, hidden, strict=True))
        return torch.stack([self._captions[c] for c in captions]).to(self.device)

    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        """The frozen UNet's diffusion loss with the ControlNet's residuals added."""
        sd = self.sd[0]
        frames = batch["frames"]
        b, f = frames.shape[:2]
        with torch.no_grad():
            if "latent_mean" in batch:  # a cache of encoded frames (data.encoded)
                mean, logvar = batch["latent_mean"].flatten(0, 1), batch["latent_logvar"]
                latents = sd.vae.scaled_latents(mean, logvar.flatten(0, 1), gen)
            else:
                latents = sd.vae.encode(frames.flatten(0, 1), True, gen)
            hint = depth_hint(self.depth[0](frames).flatten(0, 1))
            drop = torch.rand(b, generator=gen, device=gen.device) < self.hparams.p_uncond
            captions = [
                "" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)
            ]
            context = self.text_context(captions).repeat_interleave(f, dim=0)

        def controlled(x, t, context, hint):
            return sd.unet(x, t, context, control=self.control_model(x, t, context, hint))

        result = training_loss(
            controlled,
            latents,
            sd.schedule,
            sd.parameterization,
            {"context": context, "hint": hint},
            min_snr_gamma=self.hparams.min_snr_gamma,
            generator=gen,
        )
        return result.loss

    def step_generator(self) -> torch.Generator:
        """A step's randomness as a function of seed and step (resumes exactly)."""
        seed = (self.hparams.seed * 1_000_003 + self.global_rank) * 1_000_003
        return torch.Generator(self.device).manual_seed(seed + self.global_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.step_generator())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["frames"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.control_ema.update(self.control_model)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out loss (trained weights), noise and timesteps fixed per batch."""
        gen = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
        self.log(
            "val/loss", self.loss(batch, gen), prog_bar=True, batch_size=batch["frames"].shape[0]
        )

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.control_model.parameters(), lr=self.hparams.lr)
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def release_controlnet(checkpoint: str | Path, output: str | Path, use_ema: bool = True) -> str:
    """A ``ControlNetTrainer`` checkpoint -> the ControlNet in the original layout
    (``control_model.*``, fp16 ``.safetensors``), written atomically; returns its sha256.
    Raises ``CheckpointError`` for a checkpoint of another trainer."""
    checkpoint, output = Path(checkpoint), Path(output)
    state, _ = read_training_checkpoint(checkpoint)
    control = {
        k[len(ORIGINAL_PREFIX) :]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)
    }
    if not control:
        raise CheckpointError(
            f"{checkpoint}: not a ControlNetTrainer checkpoint (no control_model.*)"
        )
    if use_ema:
        ema = {
            k[len("control_ema.") :]: v for k, v in state.items() if k.startswith("control_ema.")
        }
        control = {
            k: ema.get(k.replace(".", ""), v) if v.is_floating_point() else v
            for k, v in control.items()
        }
    tensors = {ORIGINAL_PREFIX + k: v.half().contiguous() for k, v in control.items()}
    metadata = {"source_checkpoint": checkpoint.name, "ema": str(use_ema).lower()}
    save_safetensors(tensors, output, metadata=metadata)
    return file_sha256(output)
