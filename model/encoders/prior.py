"""A diffusion prior from CLIP text embeddings to CLIP image embeddings, as DALL-E 2's.

Gen-1 is conditioned on CLIP image embeddings; for a text prompt, this prior draws an image
embedding from the prompt's text embedding (Ramesh et al. 2022, "Hierarchical Text-
Conditional Image Generation with CLIP Latents", section 2.1). The network is a small causal
transformer over four tokens, [text embedding, timestep, noisy image embedding, learned
query]; the query's output is the clean image embedding (x0-parameterisation, MSE loss).

Embedding spaces: the text embedding is L2-normalised and scaled by sqrt(D). The image
embedding is L2-normalised and then either scaled by sqrt(D) (``normalization="l2"``, DALL-E 2)
or standardised per dimension with the training set's mean and std of the unit embeddings
(``"standardize"``, as Karlo's prior does); both give components of about unit variance. A
sample is mapped back to a unit direction times the training set's mean raw norm, so it has
the scale of ``ClipEmbedder.encode_image``'s (unnormalised) output, which Gen-1 takes.

Sampling runs through ``model.diffusion.samplers``: ``PriorDenoiser`` makes the x0-network a
denoiser of sigma. ``prior_function(prior, seed)`` is the callable
``model.editing.content.text_content`` takes.
``export_prior`` writes a ``.safetensors`` with the config as JSON metadata, read back by
``load_prior``. Training and evaluation live in ``model.training.prior_training``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from model.diffusion.samplers import get_sigmas, resolve_sampler, sampler_kwargs
from model.diffusion.schedule import DiscreteSchedule
from model.nets.unet import timestep_embedding
from model.weights.atomic import save_safetensors
from model.weights.checkpoint import CheckpointError

FORMAT = "gen1-prior/1"
CONFIG_KEY = "prior_config"
NORMALIZATIONS = ("l2", "standardize")


# -- noise schedule ----------------------------------------------------------------------------


class CosineSchedule(DiscreteSchedule):
    """Nichol & Dhariwal's cosine schedule (betas capped at ``max_beta``), as DALL-E 2's prior
    uses, with ``DiscreteSchedule``'s sigma view and interpolation."""

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        self.num_timesteps, self.zero_terminal_snr = num_timesteps, False
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()


def build_schedule(name: str, num_timesteps: int) -> DiscreteSchedule:
    """The prior's schedule: "cosine" (DALL-E 2) or "scaled_linear" (Stable Diffusion's)."""
    if name == "cosine":
        return CosineSchedule(num_timesteps)
    if name == "scaled_linear":
        return DiscreteSchedule(num_timesteps)
    raise ValueError(f"prior schedule must be 'cosine' or 'scaled_linear', got {name!r}")


# -- network -----------------------------------------------------------------------------------


class Block(nn.Module):
    """A pre-norm transformer block with causal self-attention (SDPA) and a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"prior width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).unbind(2)
        p = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class Prior(nn.Module):
    """The causal transformer predicting the clean image embedding (in the prior's space).

    Buffers hold the image-embedding statistics of the training set (``set_image_stats``):
    the mean and std of the unit embeddings and the mean raw norm; they travel with the file.
    """

    def __init__(
        self,
        embed_dim: int,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_timesteps: int = 1000,
        schedule: str = "cosine",
        normalization: str = "l2",
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        self.config = {
            "embed_dim": embed_dim,
            "width": width,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "dropout": dropout,
            "num_timesteps": num_timesteps,
            "schedule": schedule,
            "normalization": normalization,
        }
        self.embed_dim, self.width, self.normalization = embed_dim, width, normalization
        self.schedule = build_schedule(schedule, num_timesteps)
        self.text_in = nn.Linear(embed_dim, width)
        self.image_in = nn.Linear(embed_dim, width)
        self.time_in = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.null_text = nn.Parameter(torch.zeros(width))  # the dropped text (guidance)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.position = nn.Parameter(torch.randn(4, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)
        self.register_buffer("image_mean", torch.zeros(embed_dim))
        self.register_buffer("image_std", torch.ones(embed_dim))
        self.register_buffer("image_norm", torch.ones(()))
        self.register_buffer("has_stats", torch.zeros((), dtype=torch.bool))

    # embedding spaces

    @torch.no_grad()
    def set_image_stats(self, images: torch.Tensor) -> None:
        """Record the statistics of raw training image embeddings ``(N, D)``."""
        if images.ndim != 2 or images.shape[1] != self.embed_dim or len(images) < 2:
            raise ValueError(
                f"image statistics need (N >= 2, {self.embed_dim}) embeddings, "
                f"got {tuple(images.shape)}"
            )
        images = images.float().to(self.image_mean.device)
        unit = F.normalize(images, dim=-1)
        self.image_mean.copy_(unit.mean(0))
        self.image_std.copy_(unit.std(0).clamp_min(1e-6))
        self.image_norm.copy_(images.norm(dim=-1).mean())
        self.has_stats.fill_(True)

    def text_space(self, text: torch.Tensor) -> torch.Tensor:
        """Raw CLIP text embeddings -> the prior's conditioning (unit norm times sqrt(D))."""
        return F.normalize(text.float(), dim=-1) * math.sqrt(self.embed_dim)

    def image_space(self, images: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image embeddings -> the space the diffusion runs in."""
        unit = F.normalize(images.float(), dim=-1)
        if self.normalization == "l2":
            return unit * math.sqrt(self.embed_dim)
        return (unit - self.image_mean) / self.image_std

    def image_from_space(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``image_space`` up to the norm: the mean raw norm of training data."""
        if self.normalization == "standardize":
            x = x * self.image_std + self.image_mean
        return F.normalize(x, dim=-1) * self.image_norm

    # network

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        keep_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The clean image embedding ``(B, D)`` from the DDPM-space noisy one ``x_t`` at
        (fractional) timesteps ``t`` (B,), given ``text`` in text space; rows where
        ``keep_text`` is False see the learned null text instead."""
        text_token = self.text_in(text)
        if keep_text is not None:
            text_token = torch.where(keep_text[:, None], text_token, self.null_text.to(text_token))
        time_token = self.time_in(timestep_embedding(t, self.width).to(text_token))
        query = self.query.expand(len(x_t), -1)
        tokens = torch.stack([text_token, time_token, self.image_in(x_t), query], dim=1)
        tokens = tokens + self.position
        for block in self.blocks:
            tokens = block(tokens)
        return self.out(self.norm_out(tokens[:, -1]))

    # sampling

    @torch.no_grad()
    def sample(
        self,
        text: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        sampler: str = "ddim",
        steps: int = 64,
        schedule: str | None = "trailing",
        guidance_scale: float = 1.0,
        eta: float | None = None,
        num_candidates: int = 1,
        progress: bool = False,
    ) -> torch.Tensor:
        """Image embeddings ``(B, D)`` (raw CLIP scale) for raw text embeddings ``(B, D)``.

        Any sampler of ``model.diffusion.samplers``; ``guidance_scale`` > 1 is classifier-free
        guidance on the x0 prediction; ``num_candidates`` > 1 keeps, per text, the sample of highest
        cosine with the text (DALL-E 2's trick). All noise comes from ``generator``.
        """
        if not self.has_stats:
            raise RuntimeError("the prior has no image statistics: train it or load a file")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        device = self.image_mean.device
        with torch.autocast(device.type, enabled=False):
            cond = self.text_space(text.to(device)).repeat_interleave(num_candidates, dim=0)
            fn, schedule_name = resolve_sampler(sampler, schedule)
            sigmas = get_sigmas(schedule_name, steps, self.schedule, device=device)
            noise_device = generator.device if generator is not None else device
            noise = torch.randn(cond.shape, generator=generator, device=noise_device)
            x = noise.to(device) * (1 + sigmas[0] ** 2).sqrt()
            kwargs = sampler_kwargs(fn, eta, generator)
            denoiser = PriorDenoiser(self, cond, guidance_scale)
            images = self.image_from_space(fn(denoiser, x, sigmas, disable=not progress, **kwargs))
            if num_candidates == 1:
                return images
            images = images.view(len(text), num_candidates, -1)
            score = F.normalize(images, dim=-1) * F.normalize(text.to(device), dim=-1)[:, None]
            best = score.sum(-1).argmax(1)
            return images[torch.arange(len(text), device=device), best]


class PriorDenoiser:
    """The x0-predicting prior as a k-diffusion denoiser of sigma, ``D(x, sigma) -> x0``.

    ``x = x0 + sigma noise`` is the DDPM sample ``x_t = x / sqrt(1 + sigma^2)`` at the
    (fractional) timestep of sigma; an x0 network needs no other scaling. With
    ``guidance_scale`` s != 1: ``x0_null + s (x0_text - x0_null)``.
    """

    def __init__(self, prior: Prior, text: torch.Tensor, guidance_scale: float = 1.0) -> None:
        self.prior, self.text, self.guidance_scale = prior, text, guidance_scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).float().expand(x.shape[0])
        x_t = x * (sigma**2 + 1).rsqrt()[:, None]
        t = self.prior.schedule.sigma_to_t(sigma)
        if self.guidance_scale == 1.0:
            return self.prior(x_t, t, self.text)
        keep = torch.cat(
            [torch.ones_like(t, dtype=torch.bool), torch.zeros_like(t, dtype=torch.bool)]
        )
        both = self.prior(torch.cat([x_t, x_t]), torch.cat([t, t]), self.text.repeat(2, 1), keep)
        cond, uncond = both.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


def prior_function(
    prior: Prior, seed: int = 0, **sample_kwargs: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(text_embedding (B, D)) -> image_embedding (B, D)`` for ``text_content``: every call
    samples with a fresh CPU generator seeded ``seed``, so equal inputs give equal outputs."""

    def fn(text: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(seed))
        images = prior.sample(text, generator=generator, **sample_kwargs)
        return images.to(device=text.device, dtype=text.dtype)

    return fn


# -- files -------------------------------------------------------------------------------------


def export_prior(
    prior: Prior, path: str | Path, extra_metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the prior (float32) with its config as JSON metadata, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"prior export path {path}: use a .safetensors file name")
    if not bool(prior.has_stats):
        raise ValueError("the prior has no image statistics yet: export it after training")
    state = {k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    metadata = {**(extra_metadata or {}), "format": FORMAT, CONFIG_KEY: json.dumps(prior.config)}
    return save_safetensors(state, path, metadata)


def read_prior_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a prior file; raises if it is missing or not a prior."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prior file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from err
    if metadata.get("format") != FORMAT or CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path}: not a prior file (format {metadata.get('format')!r}, expected {FORMAT!r};"
            " export one with PriorTrainer.export or release.py CKPT OUT --component prior)"
        )
    return metadata


def load_prior(path: str | Path) -> Prior:
    """The prior of an exported file (eval mode, float32, CPU)."""
    path = Path(path)
    metadata = read_prior_metadata(path)
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: {CONFIG_KEY} metadata is not JSON ({err})") from err
    known = set(inspect.signature(Prior.__init__).parameters) - {"self"}
    if not isinstance(config, dict) or not set(config) <= known or "embed_dim" not in config:
        raise CheckpointError(f"{path}: bad prior config {config!r} (known keys {sorted(known)})")
    try:
        prior = Prior(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad prior config ({err})") from err
    with safe_open(str(path), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    expected = prior.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: keys do not fit the prior of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    prior.load_state_dict(state, strict=True)
    if not bool(prior.has_stats):
        raise CheckpointError(f"{path}: the prior has no image statistics (never trained)")
    return prior.eval()


# -- similarity --------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of ``(N, D)`` tensors."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)
