"""The Gen-1 LightningModule: frozen VAE, depth and CLIP around a trainable video UNet.

Built from plain config dicts (kept as hyper-parameters, so a checkpoint or a release file
rebuilds the model without Hydra and without naming classes). A training step encodes frames,
turns depth into structure at a random fidelity ``t_s``, takes the CLIP embedding of a random
frame as content (dropped to the null content with probability ``p_uncond``), and regresses
the UNet on the noised latents; image batches run with the temporal layers off (under DDP
tied in with zero weight; skipped when only temporal layers train: ``parallel.py``). Samples
draw randomness from (seed, step, place in the global batch), so one device and many train
alike. ``model.editing`` samples edited videos from it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from model.diffusion.loss import training_loss
from model.diffusion.noise import SampleDraws, correlate_frames, sample_seed
from model.diffusion.schedule import DiscreteSchedule
from model.encoders.frozen import build_content_encoder, build_depth
from model.encoders.structure import clip_structure, edit_structure
from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.sd.frame_lora import frame_lora_rows
from model.training.ema import EMA
from model.training.parallel import clip_fsdp, drop_tied_gradients, skipped_loss, tie
from model.weights.checkpoint import (
    NEW_UNET_KEYS,
    LoadReport,
    load_sd_unet,
    load_sd_vae,
    load_strict,
)
from model.weights.release import (
    UNET_PREFIX,
    inference_state,
    is_release,
    read_release,
    read_training_checkpoint,
)

log = logging.getLogger(__name__)
SKIPPED_IMAGES = ("model.trainable=%s: image batches train nothing and are skipped "
                  "(data.datamodule.image_ratio=0 does not load them)")  # fmt: skip

TRAINABLE = ("all", "temporal", "temporal_and_input")


def _params(cfg: dict) -> dict:
    """A config dict without Hydra's ``_target_``."""
    return {k: v for k, v in dict(cfg).items() if k != "_target_"}


def batch_size(batch: dict[str, Any]) -> int:
    """The number of samples of a batch (with frames, or encoder outputs only)."""
    return (batch["frames"] if "frames" in batch else batch["latent_mean"]).shape[0]


def load_stage_unet(unet: UNet, path: str) -> LoadReport:
    """Start ``unet`` from an earlier training stage: the (EMA) UNet of a Gen-1 Lightning
    checkpoint or release file; temporal layers the file lacks (an image stage) keep their
    identity initialisation, any other mismatch raises."""
    if is_release(path):
        state = read_release(path)[1]
    else:
        state = inference_state(read_training_checkpoint(path)[0], use_ema=True, path=path)
    state = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    return load_strict(unet, state, path, new_keys=NEW_UNET_KEYS)


class Gen1(pl.LightningModule):
    """Structure- and content-guided video diffusion (Esser et al. 2023) as one module.

    ``sampling`` holds editing defaults that travel with the checkpoint: ``resolution``,
    the longest frame side the model was trained at (``infer.py``'s default). It implements
    the editing pipeline's model interface (``model.editing.interface``) and runs the methods
    in ``methods``: the video model (``gen1``, its default), frame-by-frame ``mov2mov`` and
    the other training-free methods on its image model (temporal layers off).
    """

    methods = ("gen1", "mov2mov", "cross_frame", "motion_noise", "multi_frame", "prev_frame")

    def __init__(
        self,
        unet: dict,
        vae: dict,
        clip: dict,
        depth: dict | None = None,
        weights: dict | None = None,
        parameterization: str = "eps",
        schedule: dict | None = None,
        t_s_max: int = 7,
        p_uncond: float = 0.1,
        trainable: str = "all",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 500,
        ema_decay: float | None = 0.9999,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        noise_correlation: float = 0.0,
        sampling: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if trainable not in TRAINABLE:
            raise ValueError(f"model.trainable must be one of {TRAINABLE}, got {trainable!r}")
        self.save_hyperparameters()
        weights = dict(weights or {})
        self.vae = AutoencoderKL(**_params(vae))
        self.unet = UNet(**_params(unet))
        if weights.get("sd_checkpoint"):
            log.info(
                "%s",
                load_sd_unet(self.unet, weights["sd_checkpoint"], weights.get("use_ema", False)),
            )
        if weights.get("unet"):
            log.info("%s", load_stage_unet(self.unet, weights["unet"]))
        if weights.get("vae") or weights.get("sd_checkpoint"):
            log.info("%s", load_sd_vae(self.vae, weights.get("vae") or weights["sd_checkpoint"]))
        self.vae.eval().requires_grad_(False)
        self.clip = build_content_encoder(clip)
        self.depth = build_depth(depth)
        self.frame_loras = None  # keyframed LoRAs (model.sd.frame_lora), set by infer.py
        self.schedule = DiscreteSchedule(**(schedule or {}))
        self.structure_channels = self.unet.in_channels - self.vae.decoder.conv_in.in_channels
        if self.structure_channels not in (0, 1):
            raise ValueError(
                f"unet.in_channels ({self.unet.in_channels}) must be the latent channels "
                f"({self.vae.decoder.conv_in.in_channels}) plus 0 or 1 structure channel"
            )
        self._set_trainable(trainable)
        self.ema = EMA(self.unet, ema_decay) if ema_decay is not None else None
        temporal = {id(p) for p in self.unet.temporal_parameters()}
        self._temporal_trainable = [p for p in self.unet.temporal_parameters() if p.requires_grad]
        self._trains_images = any(
            p.requires_grad and id(p) not in temporal for p in self.unet.parameters()
        )
        self._trained_video, self._trained_batches, self._warned_skip = False, 0, False

    # -- parts -----------------------------------------------------------------------------

    def _set_trainable(self, trainable: str) -> None:
        self.unet.requires_grad_(trainable == "all")
        if trainable != "all":
            for p in self.unet.temporal_parameters():
                p.requires_grad_(True)
        if trainable == "temporal_and_input":
            self.unet.input_blocks[0][0].requires_grad_(True)

    def train(self, mode: bool = True) -> Gen1:
        """Only the UNet ever trains; the encoders stay frozen in eval mode."""
        super().train(mode)
        self.vae.eval()
        self.clip.eval()
        return self

    def denoiser_model(self, use_ema: bool = False) -> nn.Module:
        """The UNet that sampling uses: the EMA copy when asked and available."""
        return self.ema.model if use_ema and self.ema is not None else self.unet

    @contextmanager
    def ema_weights(self):
        """Within the block ``self.unet`` is the EMA copy (when there is one)."""
        if self.ema is None:
            yield self
            return
        trained = self.unet
        self.unet, self.ema.model = self.ema.model, trained
        try:
            yield self
        finally:
            self.ema.model, self.unet = self.unet, trained

    @property
    def parameterization(self) -> str:
        """ "eps" or "v": what the UNet predicts."""
        return self.hparams.parameterization

    @property
    def uses_depth(self) -> bool:
        """Whether an edit needs the frames' depth (the UNet takes a structure channel)."""
        return bool(self.structure_channels)

    def sampling_unet(self) -> nn.Module:
        """The UNet editing samples with: the EMA copy when there is one."""
        return self.denoiser_model(use_ema=True)

    def edit_conditioning(
        self,
        content: torch.Tensor,
        *,
        batch: int,
        latent_size,
        device: torch.device,
        depth: torch.Tensor | None = None,
        t_s: int = 0,
        frames_independent: bool = False,
        **_: Any,
    ) -> tuple[dict, dict]:
        """``(cond, uncond)`` of an edit: content ``(B or 1, 1, D)`` (null content: zeros) and
        the structure of ``depth`` ``(B, F, 1, H, W)`` at ``latent_size``, blurred ``t_s`` times,
        normalised over each clip, or over each frame alone when ``frames_independent`` (as
        the image model saw single frames in training). Frames and masks are not used."""
        structure = None
        if self.structure_channels:
            structure = edit_structure(depth, latent_size, t_s, frames_independent).to(device)
        content = content.to(device).float()
        # content (B or 1, 1, D), or per frame (B or 1, F, 1, D): a keyframe schedule
        content = content.expand(batch, *content.shape[1:])
        return {"context": content, "structure": structure}, {"context": torch.zeros_like(content)}

    def model_fn(self, unet: nn.Module | None = None):
        """``fn(x, t, context, structure, temporal, lora_scale)``: as SD's ``model_fn``."""
        unet = unet or self.unet

        def fn(x, t, context=None, structure=None, temporal=True, lora_scale=None):
            if self.structure_channels:
                x = torch.cat([x, structure.to(x.dtype)], dim=-3)
            with frame_lora_rows(self.frame_loras, lora_scale):
                return unet(x, t, context, temporal=temporal)

        return fn

    @torch.no_grad()
    def encode_content(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings ``(B, 1, D)`` of images ``(B, 3, H, W)`` in [-1, 1]."""
        return self.clip.encode_image(images)[:, None]

    @torch.no_grad()
    def structure(self, frames: torch.Tensor, latent_size, t_s, depth=None) -> torch.Tensor | None:
        """Structure ``(B, F, 1, h, w)`` of frames (MiDaS), or of a given exact ``depth``."""
        if not self.structure_channels:
            return None
        if depth is None:
            if self.depth is None:
                raise ValueError("model.depth is null: the batch must carry 'depth'")
            depth = self.depth(frames)
        return clip_structure(depth, tuple(latent_size), t_s)

    # -- training --------------------------------------------------------------------------

    def step_draws(self, batch_size: int, batch_idx: int = 0) -> SampleDraws:
        """The randomness of a training step: sample j of this rank draws from (seed, step,
        place), ``place = rank * batch_size + j`` its place in the global batch (ranks hold
        consecutive slices of it, as the batch samplers deal them). Lightning does not
        checkpoint RNG states; with this a resumed run draws what the unbroken one did, and
        a global batch draws the same on one device or many."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        step = self.global_step * accumulate + batch_idx % accumulate
        first = self.global_rank * batch_size
        seeds = [sample_seed(self.hparams.seed, step, first + j) for j in range(batch_size)]
        return SampleDraws(seeds, self.device)

    def conditioning(self, batch: dict[str, Any], draws: SampleDraws) -> tuple[torch.Tensor, dict]:
        """Latents and the UNet's conditioning for a training batch (encoders frozen)."""
        encoded = "latent_mean" in batch  # encoder outputs computed earlier (data.encoded, shards)
        frames = batch.get("frames")
        b, f = (batch["latent_mean"] if encoded else frames).shape[:2]
        device = (batch["latent_mean"] if encoded else frames).device
        with torch.no_grad():
            if encoded:
                mean, logvar = batch["latent_mean"], batch["latent_logvar"]
            else:
                mean, logvar = self.vae.video_moments(frames)
            eps = draws.randn(*mean.shape[1:], dtype=mean.dtype).to(device)
            latents = self.vae.scaled_latents(mean, logvar, noise=eps)
            t_s = draws.randint(0, self.hparams.t_s_max + 1).to(device)
            structure = self.structure(frames, latents.shape[-2:], t_s, batch.get("depth"))
            pick = draws.randint(0, f).to(device)
            rows = torch.arange(b, device=device)
            if encoded:
                content = batch["content"][rows, pick][:, None]
            else:
                content = self.encode_content(frames[rows, pick])
            keep = draws.rand().to(device) >= self.hparams.p_uncond
            content = content * keep[:, None, None].to(content.dtype)
        temporal = torch.as_tensor(batch.get("is_video", True), device=device).expand(b).clone()
        return latents, {"context": content, "structure": structure, "temporal": temporal}

    def loss(self, batch: dict[str, Any], unet: nn.Module, draws: SampleDraws | torch.Generator):
        """The diffusion loss of a batch, all randomness drawn from ``draws`` (per sample; a
        generator seeds them), and whether the batch was all clips."""
        if isinstance(draws, torch.Generator):
            draws = SampleDraws.from_generator(draws, batch_size(batch))
        latents, cond = self.conditioning(batch, draws)
        t = draws.randint(0, self.schedule.num_timesteps)
        noise = draws.randn(*latents.shape[1:], dtype=latents.dtype).to(latents.device)
        if self.hparams.offset_noise:  # per sample and channel, shared by frames and pixels
            offset = draws.randn(1, latents.shape[2], 1, 1, dtype=latents.dtype)
            noise = noise + self.hparams.offset_noise * offset.to(latents.device)
        top = self.hparams.noise_correlation
        if top > 0 and latents.shape[1] > 1:  # clips: frames' noise correlation c ~ U(0, top)
            c = (draws.rand() * top).to(latents.device)
            common = draws.randn(1, *latents.shape[2:], dtype=latents.dtype).to(latents.device)
            noise = correlate_frames(noise, c, common=common)
        result = training_loss(
            self.model_fn(unet),
            latents,
            self.schedule,
            self.hparams.parameterization,
            cond,
            t=t,
            noise=noise,
            min_snr_gamma=self.hparams.min_snr_gamma,
        )
        return result.loss, bool(cond["temporal"].all())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        size = batch_size(batch)
        video = bool(torch.as_tensor(batch.get("is_video", True)).all())
        if not video and not self._trains_images:  # skipped without running the UNet
            if not self._warned_skip:
                self._warned_skip = True
                log.warning(SKIPPED_IMAGES, self.hparams.trainable)
            return skipped_loss(self.device)
        loss, video = self.loss(batch, self.unet, self.step_draws(size, batch_idx))
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log(f"train/loss_{'video' if video else 'image'}", loss, batch_size=size)
        self._trained_video |= video
        self._trained_batches += 1
        if not video and isinstance(self.trainer.strategy, pl.strategies.DDPStrategy):
            loss = tie(loss, self._temporal_trainable)  # DDP all-reduces every parameter
        return loss

    def on_after_backward(self) -> None:
        """After an image batch's backward (and DDP's all-reduce), its temporal layers have
        zero gradients where one process has none: drop them, so AdamW skips those layers
        as it does in one process (a zero gradient would still move them)."""
        if not self._trained_video:
            drop_tied_gradients(self._temporal_trainable)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimiser's step, then the EMA's: here rather than in ``on_train_batch_end``,
        which runs after the checkpoint callback, so a checkpoint saved mid-epoch held an EMA
        one update behind its weights and a resumed run's EMA drifted from the unbroken one's.
        A step whose batches were all skipped moves neither.
        """
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self._trained_batches:
            self.ema.update(self.unet)
        self._trained_video, self._trained_batches = False, 0

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clipping by norm over every shard under FSDP (Lightning's own refuses it)."""
        if not clip_fsdp(self.trainer.strategy.model, gradient_clip_val):
            clip = super().configure_gradient_clipping
            clip(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        gen = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
        loss, _ = self.loss(batch, self.denoiser_model(use_ema=True), gen)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size(batch))

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
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
