"""(caption, image) pairs embedded by a frozen CLIP, cached on disk: the prior's training data.

A source is any dataset config whose samples hold ``frames`` (F, 3, H, W) in [-1, 1] and a
``caption``: the procedural world (``data.synthetic.SyntheticWorldDataset``) or an image
folder / manifest (``data.datasets.ImageDataset``: captions from sidecar ``.txt`` files or a
manifest's ``caption`` column). Every frame with a non-empty caption becomes one pair; the
cache holds per pair the CLIP image embedding, the caption's CLIP text embedding (both raw,
unnormalised) and the index of the source sample it came from.

The cache file is keyed by the source config, a fingerprint of a folder's or manifest's
files, the CLIP config and the sha256 of its weights: a changed key rebuilds it (atomically,
with a progress bar); a matching one loads.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.cache import digest, plain, read_cache, write_cache
from data.datamodule import JointBatchSampler
from model.weights.atomic import file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = "gen1-caption-embeddings/1"
TENSORS = ("image", "text", "sample")


def source_fingerprint(source: dict) -> str | None:
    """What a config cannot say about its files: a manifest's sha256, or the names, sizes and
    modification times of a folder's files (so added or edited images rebuild the cache)."""
    if source.get("manifest"):
        return file_sha256(source["manifest"])
    root = source.get("root")
    if not root or not Path(root).is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(
                f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def cache_key(source: dict, clip: dict) -> str:
    """A digest of everything the cached embeddings depend on."""
    weights = clip.get("weights")
    described = {
        "format": CACHE_FORMAT,
        "source": source,
        "files": source_fingerprint(source),
        "clip": clip,
        "clip_weights": file_sha256(weights) if weights else None,
    }
    return digest(described)


def build_clip_embedder(clip):
    """The frozen CLIP: a ``ClipEmbedder`` as it is, or one built from ``{model, weights}``
    (random weights, with a warning, when unset)."""
    from model.encoders.clip import ClipEmbedder
    from model.encoders.frozen import build_content_encoder

    return clip if isinstance(clip, ClipEmbedder) else build_content_encoder(clip)


@torch.no_grad()
def embed_pairs(
    dataset: Dataset, clip, batch_size: int = 64, progress: bool = True
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Embeddings of every (frame, caption) pair of ``dataset``, with captions and keys.

    Samples without a caption are skipped (a prior cannot learn from them), with a warning.
    """
    embedder = build_clip_embedder(clip)
    images, samples, captions, keys, uncaptioned = [], [], [], [], 0
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            images.append(embedder.encode_image(torch.cat(pending)))
            pending.clear()

    for index in tqdm(range(len(dataset)), desc="embedding pairs", disable=not progress):
        sample = dataset[index]
        caption = str(sample.get("caption") or "").strip()
        if not caption:
            uncaptioned += 1
            continue
        frames = sample["frames"]
        pending.append(frames)
        samples += [index] * len(frames)
        captions += [caption] * len(frames)
        keys += [f"{sample['key']}@{i}" for i in range(len(frames))]
        if sum(len(p) for p in pending) >= batch_size:
            flush()
    flush()
    if uncaptioned:
        log.warning("%d of %d samples have no caption and were skipped", uncaptioned, len(dataset))
    if not captions:
        raise ValueError(f"no captioned samples among the {len(dataset)} of the source")
    unique = sorted(set(captions))
    text = torch.cat(
        [embedder.encode_text(unique[i : i + 256]) for i in range(0, len(unique), 256)]
    )
    row = {caption: i for i, caption in enumerate(unique)}
    tensors = {
        "image": torch.cat(images),
        "text": text[torch.tensor([row[c] for c in captions])],
        "sample": torch.tensor(samples, dtype=torch.int64),
    }
    return tensors, captions, keys


class CaptionEmbeddingDataset(Dataset):
    """The (frame, caption) pairs of ``source`` (a dataset config) as cached CLIP embeddings.

    Samples: ``image_embedding`` (D,), ``text_embedding`` (D,), ``caption``, ``key``.
    ``rebuilt`` says whether this instance computed the cache (False: it was reused).
    """

    def __init__(
        self, source: Any, path: str, clip: Any, batch_size: int = 64, progress: bool = True
    ) -> None:
        source, clip = plain(source), plain(clip)
        self.path = Path(path)
        key = cache_key(source, clip)
        found, tensors, captions, keys = read_cache(self.path, CACHE_FORMAT, TENSORS)
        self.rebuilt = found != key
        if self.rebuilt:
            if found is not None:
                log.info("%s was made from other data or another CLIP: rebuilding it", self.path)
            tensors, captions, keys = embed_pairs(instantiate(source), clip, batch_size, progress)
            write_cache(self.path, CACHE_FORMAT, key, tensors, captions, keys)
            log.info("cached %d caption-image pairs in %s", len(keys), self.path)
        self.image, self.text, self.sample = tensors["image"], tensors["text"], tensors["sample"]
        self.captions, self.keys = captions, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        return {
            "image_embedding": self.image[index],
            "text_embedding": self.text[index],
            "caption": self.captions[index],
            "key": self.keys[index],
        }


class PairSubset(Dataset):
    """Some pairs of a ``CaptionEmbeddingDataset`` (a train / val split of one source)."""

    def __init__(self, pairs: CaptionEmbeddingDataset, indices: torch.Tensor) -> None:
        self.pairs, self.indices = pairs, indices
        self.image = pairs.image[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.pairs[int(self.indices[index])]


def split_by_sample(
    pairs: CaptionEmbeddingDataset, val_fraction: float, seed: int
) -> tuple[PairSubset, PairSubset]:
    """Train / val pairs, whole source samples (all frames of a clip) on one side."""
    samples = pairs.sample.unique()
    order = samples[torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))]
    held = order[: max(1, round(val_fraction * len(samples)))]
    is_val = torch.isin(pairs.sample, held)
    if bool(is_val.all()):
        raise ValueError(f"val_fraction {val_fraction} leaves no training pairs")
    return (
        PairSubset(pairs, torch.nonzero(~is_val).flatten()),
        PairSubset(pairs, torch.nonzero(is_val).flatten()),
    )


def collate_pairs(samples: list[dict]) -> dict:
    """Stack pairs into ``image_embedding`` / ``text_embedding`` (B, D) and lists."""
    return {
        "image_embedding": torch.stack([s["image_embedding"] for s in samples]),
        "text_embedding": torch.stack([s["text_embedding"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class CaptionEmbeddingDataModule(pl.LightningDataModule):
    """Endless, step-indexed, seeded training batches of pairs (resumable exactly, sharded by
    rank) and fixed-order validation; ``val_fraction`` holds out source samples of the
    training set when no ``val_dataset`` is given."""

    def __init__(
        self,
        train_dataset: CaptionEmbeddingDataset,
        val_dataset: Dataset | None = None,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if val_dataset is None and val_fraction > 0:
            train_dataset, val_dataset = split_by_sample(train_dataset, val_fraction, seed)
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.seed = seed

    def train_image_embeddings(self) -> torch.Tensor:
        """The raw image embeddings of the training pairs (for the prior's statistics)."""
        return self.train_dataset.image

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer else (1, 0)

    def train_dataloader(self) -> DataLoader:
        num_replicas, rank = self._world()
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        sampler = JointBatchSampler(
            num_videos=len(self.train_dataset),
            num_images=0,
            batch_size=self.batch_size,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            start_step=start,
        )
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=collate_pairs)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        num_replicas, rank = self._world()
        indices = list(range(rank, len(self.val_dataset), num_replicas))
        return DataLoader(
            torch.utils.data.Subset(self.val_dataset, indices),
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=collate_pairs,
        )


def world_pairs(
    clip,
    num_clips: int = 1000,
    num_frames: int = 1,
    size: int = 64,
    split: str = "test",
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``(text, image)`` embeddings ``(N, D)`` of the world's (caption, frame) pairs of
    ``split`` (not cached: for evaluation)."""
    from data.synthetic import SyntheticWorldDataset

    world = SyntheticWorldDataset(
        num_clips=num_clips, num_frames=num_frames, size=size, split=split, seed=seed
    )
    tensors, _, _ = embed_pairs(world, clip, progress=progress)
    return tensors["text"], tensors["image"]
