"""Clips with what Gen-1's frozen encoders make of them, computed once and cached on disk.

The VAE, MiDaS and CLIP never train with the UNet, so their outputs for a fixed set of
clips can be computed once: a cache file holds, per clip and frame, the frames (uint8), the
VAE posterior's mean and log-variance, the depth (MiDaS when the model has one, else the
source's exact depth) and the CLIP image embedding. A training step then samples latents
from the stored posterior and runs only the UNet, several times faster on small models.

The file is keyed by the source dataset's config and the encoders' configs and weight
hashes: a changed key rebuilds it (atomically, with a progress bar); a matching one loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.data import Dataset
from tqdm import tqdm

from data.cache import digest, plain, read_cache, write_cache
from model.weights.atomic import file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = "gen1-encoded-clips/1"
TENSORS = ("frames", "latent_mean", "latent_logvar", "depth", "content")


def weight_digest(path: str | None) -> str | None:
    """The sha256 of a weight file (None when there is none)."""
    return file_sha256(path) if path else None


def cache_key(source: dict, vae: dict, vae_weights: str | None, clip: dict, depth: dict | None):
    """A digest of everything the cached tensors depend on."""
    described = {
        "format": CACHE_FORMAT,
        "source": source,
        "vae": vae,
        "vae_weights": weight_digest(vae_weights),
        "clip": clip,
        "clip_weights": weight_digest(clip.get("weights")),
        "depth": depth,
        "depth_weights": weight_digest((depth or {}).get("weights")),
    }
    return digest(described)


def build_encoders(vae: dict, vae_weights: str | None, clip: dict, depth: dict | None = None):
    """The frozen ``(VAE, CLIP, MiDaS or None)`` of a Gen-1 model config, in eval mode."""
    from model.encoders.frozen import build_content_encoder, build_depth
    from model.nets.autoencoder import AutoencoderKL
    from model.weights.checkpoint import load_sd_vae

    autoencoder = AutoencoderKL(**{k: v for k, v in vae.items() if k != "_target_"})
    if vae_weights:
        load_sd_vae(autoencoder, vae_weights)
    else:
        log.warning("no VAE weights given: the encoded latents are a random VAE's")
    depth_estimator = build_depth(depth)
    if depth_estimator is not None:
        depth_estimator.eval().requires_grad_(False)
    content_encoder = build_content_encoder(clip).eval().requires_grad_(False)
    return autoencoder.eval().requires_grad_(False), content_encoder, depth_estimator


@torch.no_grad()
def encode_dataset(
    dataset: Dataset,
    vae: dict,
    vae_weights: str | None,
    clip: dict,
    depth: dict | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The cached tensors of every sample of ``dataset``, plus captions and keys."""
    autoencoder, content_encoder, depth_estimator = build_encoders(vae, vae_weights, clip, depth)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
    captions, keys = [], []
    for index in tqdm(range(len(dataset)), desc="encoding clips", disable=not progress):
        sample = dataset[index]
        frames = sample["frames"]  # (F, 3, H, W) in [-1, 1]
        moments = [autoencoder.moments(chunk) for chunk in frames.split(batch_size)]
        mean, logvar = (torch.cat([m[i] for m in moments]) for i in (0, 1))
        if depth_estimator is not None:
            depth_map = depth_estimator(frames[None])[0]
        elif "depth" in sample:
            depth_map = sample["depth"]
        else:
            raise ValueError(
                f"{sample['key']}: the source has no depth and the model no MiDaS (model.depth)"
            )
        parts["frames"].append(((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        parts["latent_mean"].append(mean)
        parts["latent_logvar"].append(logvar)
        parts["depth"].append(depth_map.to(torch.float16))
        parts["content"].append(content_encoder.encode_image(frames))
        captions.append(sample["caption"])
        keys.append(sample["key"])
    return {name: torch.stack(values) for name, values in parts.items()}, captions, keys


class EncodedClipDataset(Dataset):
    """The clips of ``source`` (a dataset config) with their cached encoder outputs.

    ``single_frames=True`` serves every frame of every clip as an image sample (for joint
    image + video batches from the same cache). Samples hold ``frames`` (F, 3, H, W) in
    [-1, 1], ``latent_mean`` / ``latent_logvar`` (unscaled), ``depth`` (F, 1, H, W) and
    ``content`` (F, D), with ``caption``, ``key`` and ``is_video``.
    """

    carries_depth = True  # samples hold 'depth' (cached MiDaS depth); jobs.training checks it

    def __init__(
        self,
        source: Any,
        path: str,
        vae: Any,
        clip: Any,
        vae_weights: str | None = None,
        depth: Any = None,
        single_frames: bool = False,
        progress: bool = True,
    ) -> None:
        source, vae, clip, depth = (plain(c) for c in (source, vae, clip, depth))
        self.path, self.single_frames = Path(path), single_frames
        key = cache_key(source, vae, vae_weights, clip, depth)
        found, tensors, captions, keys = read_cache(self.path, CACHE_FORMAT, TENSORS)
        if found != key:
            if found is not None:
                log.info("%s was made from other data or encoders: rebuilding it", self.path)
            dataset = instantiate(source)
            tensors, captions, keys = encode_dataset(
                dataset, vae, vae_weights, clip, depth, progress=progress
            )
            write_cache(self.path, CACHE_FORMAT, key, tensors, captions, keys)
            log.info("cached %d encoded clips in %s", len(keys), self.path)
        self.tensors, self.captions, self.keys = tensors, captions, keys
        self.num_clips, self.num_frames = tensors["frames"].shape[:2]

    def __len__(self) -> int:
        return self.num_clips * self.num_frames if self.single_frames else self.num_clips

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        clip, frames = index, slice(None)
        if self.single_frames:
            clip, frame = divmod(index, self.num_frames)
            frames = slice(frame, frame + 1)
        sample = {name: value[clip, frames] for name, value in self.tensors.items()}
        sample["frames"] = sample["frames"].float() / 127.5 - 1.0
        sample["depth"] = sample["depth"].float()
        key = self.keys[clip] + (f"@{frames.start}" if self.single_frames else "")
        is_video = not self.single_frames and self.num_frames > 1
        return {**sample, "caption": self.captions[clip], "key": key, "is_video": is_video}
