"""Training and evaluation of the text -> image-embedding prior of ``model.prior``.

``PriorTrainer`` trains it (``python train.py experiment=tiny_prior``) and exports it;
``evaluate_prior`` measures its samples. Kept apart from ``model.prior`` so inference loads
the network without Lightning. ``python -m model.prior_training export CKPT OUT`` /
``python -m model.prior_training evaluate PRIOR ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.prior import Prior, cosine, export_prior, load_prior, read_prior_metadata
from model.tiny_trainers import ComponentTrainer

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
                from model.atomic import file_sha256

                clip["weights_sha256"] = file_sha256(weights)
            extra["clip"] = json.dumps(clip)
        return export_prior(self.prior, path, extra)


# -- command line ------------------------------------------------------------------------------


def _evaluate_world(args: argparse.Namespace) -> dict[str, float]:
    from data.captions import world_pairs

    prior = load_prior(args.prior)
    metadata = read_prior_metadata(args.prior)
    clip = json.loads(metadata.get("clip", "{}"))
    weights = args.clip_weights or clip.get("weights")
    model = args.clip_model or clip.get("model", "clip_tiny")
    text, images = world_pairs(
        {"model": model, "weights": weights},
        num_clips=args.num_clips,
        num_frames=args.num_frames,
        size=args.size,
        split=args.split,
        seed=args.world_seed,
    )
    return evaluate_prior(
        prior,
        text,
        images,
        seed=args.seed,
        sampler=args.sampler,
        steps=args.steps,
        schedule=args.schedule,
        guidance_scale=args.guidance_scale,
        num_candidates=args.num_candidates,
    )


def main(argv: list[str] | None = None) -> None:
    """``export CKPT OUT``: a PriorTrainer checkpoint to a prior file. ``evaluate PRIOR``:
    held-out cosines on the procedural world's test split."""
    parser = argparse.ArgumentParser(
        prog="python -m model.prior_training", description=main.__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="Lightning checkpoint -> prior .safetensors")
    export.add_argument("checkpoint")
    export.add_argument("output")
    evaluate = commands.add_parser("evaluate", help="cosines on held-out world captions")
    evaluate.add_argument("prior")
    evaluate.add_argument("--clip-weights", help="default: the CLIP recorded in the prior file")
    evaluate.add_argument("--clip-model", help="default: the CLIP recorded in the prior file")
    evaluate.add_argument("--num-clips", type=int, default=1000)
    evaluate.add_argument("--num-frames", type=int, default=1)
    evaluate.add_argument("--size", type=int, default=64)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--world-seed", type=int, default=0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--sampler", default="ddim")
    evaluate.add_argument("--steps", type=int, default=64)
    evaluate.add_argument("--schedule", default="trailing")
    evaluate.add_argument("--guidance-scale", type=float, default=1.0)
    evaluate.add_argument("--num-candidates", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "export":
        trainer = PriorTrainer.load_from_checkpoint(args.checkpoint, map_location="cpu")
        print(f"wrote {trainer.export(args.output)}")
        return
    print(json.dumps(_evaluate_world(args), indent=2))


if __name__ == "__main__":
    main()
