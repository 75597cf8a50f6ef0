"""Trainers for the tiny Gen-1's frozen parts (VAE, MiDaS depth, CLIP) on the procedural world.

No pretrained weights can be downloaded, so the tiny Gen-1 gets its encoders from these
LightningModules: ``python train.py experiment=tiny_vae`` (or ``tiny_depth``, ``tiny_clip``).
Each is built from plain config values, trains one network on the world's batches, and
``export(path)`` writes that network alone, in the layout the project's loaders read
strictly: ``checkpoint.load_sd_vae``, ``depth.load_midas(path, "midas_tiny")`` and
``clip.load_clip(path, "clip_tiny")``. From a Lightning checkpoint:
``VAETrainer.load_from_checkpoint(ckpt, map_location="cpu").export("vae.safetensors")``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from model.encoders.clip import build_clip
from model.encoders.depth import build_midas, midas_input_size
from model.encoders.structure import align_scale_shift, standardise
from model.nets.autoencoder import AutoencoderKL
from model.weights.atomic import atomic_output, save_safetensors


def _params(cfg: dict) -> dict:
    """A config dict without Hydra's ``_target_``."""
    return {k: v for k, v in dict(cfg).items() if k != "_target_"}


def _save_tensors(module: nn.Module, path: str | Path, metadata: dict[str, str] | None) -> Path:
    """Write a module's state dict as ``.safetensors``, or with ``torch.save`` for ``.pt``."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth", ".ckpt"):
        raise ValueError(f"export path {path}: use a .safetensors or .pt file name")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        return save_safetensors(state, path, metadata)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path


class ComponentTrainer(pl.LightningModule):
    """What the three trainers share: AdamW (no decay on gains and biases) with linear
    warmup then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``, and per-step
    randomness drawn from (seed, rank, step) so a resumed run continues exactly."""

    def trained_module(self) -> nn.Module:
        """The network this trainer optimises and exports."""
        raise NotImplementedError

    def step_generator(self) -> torch.Generator:
        """The source of a training step's randomness."""
        seed = (self.hparams.seed * 1_000_003 + self.global_rank) * 1_000_003
        return torch.Generator(self.device).manual_seed(seed + self.global_step)

    def configure_optimizers(self):
        params = [p for p in self.trained_module().parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        warmup = max(1, self.hparams.warmup_steps)
        max_steps = self._trainer.max_steps if self._trainer is not None else -1
        floor = self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if max_steps <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / (max_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# -- VAE -------------------------------------------------------------------------------------


class VAETrainer(ComponentTrainer):
    """An ``AutoencoderKL`` trained on single frames with L1 (+ MSE) reconstruction and KL.

    ``kl_weight`` weighs the KL summed over an image's latent values against the L1 summed
    over its pixel values, LDM's convention (SD's KL-f8 used 1e-6); no GAN or LPIPS term.
    ``crop_size`` trains on random square crops (the network is convolutional), which
    makes a step cheaper; validation reconstructs whole frames. Validation also measures
    the std of sampled latents: SD's ``scale_factor`` is 1 / that std (``val/scale_factor``).
    """

    def __init__(
        self,
        vae: dict,
        kl_weight: float = 1e-6,
        mse_weight: float = 0.0,
        crop_size: int | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = AutoencoderKL(**_params(vae))
        self.latent_std: float | None = None
        self._latent_sums: list[torch.Tensor] = []

    def trained_module(self) -> nn.Module:
        return self.vae

    def crop(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random ``crop_size`` square of each image (whole images when it is unset)."""
        size = self.hparams.crop_size
        h, w = images.shape[-2:]
        if size is None or (size >= h and size >= w):
            return images
        if size > h or size > w:
            raise ValueError(f"model.crop_size {size} exceeds the frame size {h}x{w}")
        n = len(images)
        tops = torch.randint(0, h - size + 1, (n,), generator=gen, device=gen.device).tolist()
        lefts = torch.randint(0, w - size + 1, (n,), generator=gen, device=gen.device).tolist()
        crops = [
            im[:, t : t + size, s : s + size] for im, t, s in zip(images, tops, lefts, strict=True)
        ]
        return torch.stack(crops)

    def losses(self, images: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Loss terms for images ``(N, 3, H, W)``, decoding a posterior sample from ``gen``."""
        mean, logvar = self.vae.moments(images)
        noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        error = self.vae.decode_unscaled(z) - images
        l1, mse = error.abs().mean(), error.square().mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # per latent value
        kl_per_pixel = kl.flatten(1).sum(1).mean() / images[0].numel()
        loss = l1 + self.hparams.mse_weight * mse + self.hparams.kl_weight * kl_per_pixel
        return {"loss": loss, "rec": l1, "mse": mse, "kl": kl.mean()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        gen = self.step_generator()
        images = self.crop(batch["frames"].flatten(0, 1), gen)
        out = self.losses(images, gen)
        for name in ("loss", "rec", "mse", "kl"):
            self.log(f"train/{name}", out[name], prog_bar=name == "rec", batch_size=len(images))
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._latent_sums = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """PSNR and L1 of posterior-mean reconstructions; sums for the sampled latents' std."""
        images = batch["frames"].flatten(0, 1)
        mean, logvar = self.vae.moments(images)
        gen = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
        noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        z = (mean + torch.exp(0.5 * logvar) * noise).double()
        self._latent_sums.append(torch.stack([z.new_tensor(z.numel()), z.sum(), z.square().sum()]))
        recon = self.vae.decode_unscaled(mean)
        mse01 = ((recon.clamp(-1, 1) - images) / 2).square().flatten(1).mean(1)  # [0, 1] pixels
        n = len(images)
        self.log(
            "val/psnr", (-10 * mse01.clamp_min(1e-10).log10()).mean(), prog_bar=True, batch_size=n
        )
        self.log("val/rec", (recon - images).abs().mean(), batch_size=n)

    def on_validation_epoch_end(self) -> None:
        if not self._latent_sums:
            return
        count, total, squares = torch.stack(self._latent_sums).sum(0)
        std = float(((squares - total.square() / count) / (count - 1)).sqrt())
        self.latent_std = std
        self.log("val/latent_std", std)
        self.log("val/scale_factor", 1.0 / std)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["latent_std"] = self.latent_std

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.latent_std = checkpoint.get("latent_std")

    def export(self, path: str | Path) -> Path:
        """The VAE's state dict (SD's VAE key layout, no prefix), for ``load_sd_vae``.

        A ``.safetensors`` file also records ``latent_std`` and ``scale_factor`` as metadata
        when validation has measured them (a step checkpoint holds the validation before it).
        """
        metadata = None
        if self.latent_std is not None:
            metadata = {
                "latent_std": f"{self.latent_std:.6g}",
                "scale_factor": f"{1.0 / self.latent_std:.6g}",
            }
        return _save_tensors(self.vae, path, metadata)


# -- depth -----------------------------------------------------------------------------------


def gradient_matching(residual: torch.Tensor, scales: int) -> torch.Tensor:
    """MiDaS's multi-scale gradient-matching term: mean |finite differences| of the aligned
    residual ``(N, H, W)``, over ``scales`` levels that each keep every second pixel."""
    total = residual.new_zeros(())
    for level in range(scales):
        r = residual[:, :: 2**level, :: 2**level]
        if min(r.shape[-2:]) < 2:
            break
        dx = (r[:, :, 1:] - r[:, :, :-1]).abs().sum()
        dy = (r[:, 1:, :] - r[:, :-1, :]).abs().sum()
        total = total + (dx + dy) / r.numel()
    return total


class DepthTrainer(ComponentTrainer):
    """A MiDaS network supervised by the world's exact inverse depth.

    Frames are preprocessed as ``DepthEstimator.preprocess`` does; the target is resized to
    the network's output and standardised per image. Loss: MSE after the per-image
    least-squares scale and shift (so it is ``1 - r^2`` of prediction and target) plus
    ``grad_weight`` times the gradient-matching term, as in MiDaS.
    """

    def __init__(
        self,
        name: str = "midas_tiny",
        grad_weight: float = 0.5,
        grad_scales: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_midas(name).train()  # built in eval mode; BatchNorm must train
        mean, std = self.net.config.mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def trained_module(self) -> nn.Module:
        return self.net

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> network input, exactly as ``DepthEstimator``'s."""
        size = midas_input_size(frames.shape[-2], frames.shape[-1], self.net.config)
        x = F.interpolate((frames.float() + 1) / 2, size=size, mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    def prediction_and_target(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output ``(N, h, w)`` for every frame and the standardised exact depth."""
        if "depth" not in batch:
            raise ValueError("DepthTrainer needs batches with 'depth' (the synthetic world)")
        frames, depth = batch["frames"].flatten(0, 1), batch["depth"].flatten(0, 1).float()
        prediction = self.net(self.preprocess(frames))
        if depth.shape[-2:] != prediction.shape[-2:]:
            depth = F.interpolate(
                depth, size=prediction.shape[-2:], mode="bilinear", antialias=True
            )
        return prediction, standardise(depth[:, 0])

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss and its terms (scale-shift-invariant MSE, gradient matching) on a batch."""
        prediction, target = self.prediction_and_target(batch)
        residual = align_scale_shift(prediction, target) - target
        ssi = residual.square().mean()
        grad = gradient_matching(residual, self.hparams.grad_scales)
        return {"loss": ssi + self.hparams.grad_weight * grad, "ssi_mse": ssi, "grad": grad}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        n = batch["frames"].shape[:2].numel()
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name == "ssi_mse", batch_size=n)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prediction, target = self.prediction_and_target(batch)
        ssi = (align_scale_shift(prediction, target) - target).square().flatten(1).mean(1)
        corr = (standardise(prediction) * target).flatten(1).mean(1)  # Pearson r per image
        n = len(prediction)
        self.log("val/ssi_mse", ssi.mean(), prog_bar=True, batch_size=n)
        self.log("val/corr", corr.mean(), batch_size=n)

    def export(self, path: str | Path) -> Path:
        """The network's state dict (official MiDaS keys), for ``load_midas(path, name)``."""
        return _save_tensors(self.net, path, None)


# -- CLIP ------------------------------------------------------------------------------------


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of normalised embeddings ``(B, D)``, pair i being the positive of i.

    Clips with identical captions need no special case: their text embeddings are identical,
    so a twin only adds a constant ln 2 to its rows (as targets spread over the twins would)
    and changes no gradient. Retrieval metrics count a twin as a hit.
    """
    logits = scale * image_emb @ text_emb.T
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def retrieval_top1(query: torch.Tensor, keys: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Fraction of queries whose nearest key has the query's caption (the pair or a twin)."""
    best = (query @ keys.T).argmax(1).tolist()
    return torch.tensor([captions[i] == captions[j] for i, j in enumerate(best)]).float().mean()


class ClipTrainer(ComponentTrainer):
    """An open_clip model trained contrastively on (random frame of a clip, its caption).

    The model sits inside a ``ClipEmbedder`` (its preprocessing and tokenizer are the ones
    Gen-1 uses); the embedder's frozen default is lifted here. The learned ``logit_scale``
    is capped at ``max_logit_scale``, as open_clip's training caps it at 100.
    """

    def __init__(
        self,
        model: str | dict = "clip_tiny",
        max_logit_scale: float = 100.0,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedder = build_clip(model)
        self.embedder.model.requires_grad_(True)
        self.train()

    def trained_module(self) -> nn.Module:
        return self.embedder.model

    def train(self, mode: bool = True) -> ClipTrainer:
        """The embedder pins itself to eval mode; here it follows ``mode`` like any module."""
        super().train(mode)
        nn.Module.train(self.embedder, mode)
        return self

    def embed(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, ...]:
        """Normalised image and text embeddings ``(B, D)``, with gradients."""
        net = self.embedder.model
        image_emb = net.encode_image(self.embedder.preprocess(images), normalize=True)
        tokens = self.embedder.tokenize(captions).to(images.device)
        return image_emb, net.encode_text(tokens, normalize=True)

    def logit_scale(self) -> torch.Tensor:
        """The learned temperature ``exp(logit_scale)``, capped at ``max_logit_scale``."""
        limit = math.log(self.hparams.max_logit_scale)
        return self.embedder.model.logit_scale.clamp(max=limit).exp()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        frames, captions = batch["frames"], batch["caption"]
        b, f = frames.shape[:2]
        pick = torch.randint(0, f, (b,), generator=self.step_generator(), device=self.device)
        image_emb, text_emb = self.embed(
            frames[torch.arange(b, device=self.device), pick], captions
        )
        scale = self.logit_scale()
        loss = contrastive_loss(image_emb, text_emb, scale)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/logit_scale", scale, batch_size=b)
        self.log("train/top1", retrieval_top1(text_emb, image_emb, captions), batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss and retrieval among the batch's clips (first frames): batch size = candidates."""
        captions = batch["caption"]
        image_emb, text_emb = self.embed(batch["frames"][:, 0], captions)
        b = len(captions)
        loss = contrastive_loss(image_emb, text_emb, self.logit_scale())
        self.log("val/loss", loss, batch_size=b)
        top1 = retrieval_top1(text_emb, image_emb, captions)
        self.log("val/top1_text_to_image", top1, prog_bar=True, batch_size=b)
        self.log(
            "val/top1_image_to_text", retrieval_top1(image_emb, text_emb, captions), batch_size=b
        )

    def export(self, path: str | Path) -> Path:
        """The open_clip model's state dict, for ``load_clip(path, "clip_tiny")``."""
        return _save_tensors(self.embedder.model, path, None)
