"""Training and evaluation of the text -> image-embedding prior of ``model.encoders.prior``.

``PriorTrainer`` trains it (``python train.py experiment=tiny_prior``) and exports it
(``python release.py CKPT OUT --component prior``); ``evaluate_prior`` measures its samples
(``python eval.py mode=prompts``). Kept apart from ``model.encoders.prior`` so inference loads
the network without Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.encoders.prior import Prior, cosine, export_prior
from model.training.components import ComponentTrainer
from model.weights.atomic import file_sha256

# -- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_prior(
    prior: Prior,
    text: torch.Tensor,
    images: torch.Tensor,
    *,
    seed: int = 0,
    batch_size: int = 512,
    **sample_kwargs: Any,
) -> dict[str, float]:
    """Mean cosine with the true image embeddings ``(N, D)`` of the prior's samples for the
    paired text embeddings ``(N, D)`` (``cos_prior``) and of the text embeddings as they are
    (``cos_text``), plus ``cos_gain`` = their difference."""
    generator = torch.Generator().manual_seed(seed)
    samples = torch.cat(
        [
            prior.sample(chunk, generator=generator, **sample_kwargs).cpu()
            for chunk in text.split(batch_size)
        ]
    )
    cos_prior, cos_text = cosine(samples, images).mean(), cosine(text, images).mean()
    return {
        "cos_prior": float(cos_prior),
        "cos_text": float(cos_text),
        "cos_gain": float(cos_prior - cos_text),
        "count": len(text),
    }


# -- training ----------------------------------------------------------------------------------


class PriorTrainer(ComponentTrainer):
    """Trains a ``Prior`` on batches of ``image_embedding`` / ``text_embedding`` (raw CLIP).

    Loss: MSE between the predicted and the true clean image embedding (in the prior's
    space) at a uniform timestep; the text is replaced by the null text with probability
    ``p_uncond`` (for classifier-free guidance). Image statistics come from the datamodule's
    ``train_image_embeddings()`` before the first step. Validation logs the loss and the
    mean cosine to the true image embedding of prior samples (``val/cos_prior``) and of the
    raw text embedding (``val/cos_text``). ``clip`` ({model, weights}) names the CLIP whose
    embeddings the prior maps; ``export`` records it (with the weights' sha256).
    """

    def __init__(
        self,
        prior: dict,
        clip: dict | None = None,
        p_uncond: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        val_sampler: str = "ddim",
        val_steps: int = 32,
        val_schedule: str | None = "trailing",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.prior = Prior(**{k: v for k, v in dict(prior).items() if k != "_target_"})

    def trained_module(self) -> nn.Module:
        return self.prior

    def setup(self, stage: str) -> None:
        """Take the training set's image statistics (a restored checkpoint keeps its own)."""
        if bool(self.prior.has_stats):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_image_embeddings"):
            raise ValueError(
                "PriorTrainer needs a datamodule with train_image_embeddings() "
                "(data.captions.CaptionEmbeddingDataModule) or prior.set_image_stats() first"
            )
        self.prior.set_image_stats(datamodule.train_image_embeddings())

    def losses(
        self, batch: dict[str, Any], gen: torch.Generator, p_uncond: float
    ) -> dict[str, torch.Tensor]:
        """The x0 MSE of a batch, with timesteps, noise and text dropout drawn from ``gen``."""
        prior = self.prior
        x0 = prior.image_space(batch["image_embedding"])
        text = prior.text_space(batch["text_embedding"])
        b, device = len(x0), gen.device
        t = torch.randint(0, prior.schedule.num_timesteps, (b,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device).to(x0)
        keep = torch.rand(b, generator=gen, device=device) >= p_uncond
        a = prior.schedule.alphas_cumprod.to(x0.device)[t.to(x0.device)][:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = prior(x_t, t.to(x0.device), text, keep.to(x0.device))
        per_sample = (prediction - x0).square().mean(1)
        return {"loss": per_sample.mean(), "cos_x0": cosine(prediction, x0).mean()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch, self.step_generator(), self.hparams.p_uncond)
        b = len(batch["image_embedding"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=b)
        self.log("train/cos_x0", out["cos_x0"], batch_size=b)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        gen = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
        images, text = batch["image_embedding"], batch["text_embedding"]
        b = len(images)
        self.log("val/loss", self.losses(batch, gen, 0.0)["loss"], batch_size=b)
        samples = self.prior.sample(
            text,
            generator=gen,
            sampler=self.hparams.val_sampler,
            steps=self.hparams.val_steps,
            schedule=self.hparams.val_schedule,
        )
        cos_prior, cos_text = cosine(samples, images).mean(), cosine(text, images).mean()
        self.log("val/cos_prior", cos_prior, prog_bar=True, batch_size=b)
        self.log("val/cos_text", cos_text, batch_size=b)
        self.log("val/cos_gain", cos_prior - cos_text, batch_size=b)

    def export(self, path: str | Path) -> Path:
        """The prior alone as ``.safetensors`` (config and CLIP identity in metadata)."""
        extra = {}
        clip = dict(self.hparams.clip or {})
        if clip:
            weights = clip.get("weights")
            if weights and Path(weights).is_file():
                clip["weights_sha256"] = file_sha256(weights)
            extra["clip"] = json.dumps(clip)
        return export_prior(self.prior, path, extra)
