"""Batching: one-kind batches of images or clips, seeded shuffling, the LightningDataModule.

Gen-1 trains jointly on images (1-frame videos) and clips. A batch is all clips or all
images, chosen per step with probability ``image_ratio``, so every batch stacks into one
(B, F, 3, H, W) tensor. The training stream is endless and step-indexed (batch k depends on
the seed and k alone), so a resumed run sees exactly the batches an uninterrupted one would;
training is bounded by ``max_steps``. Under DDP the batch sampler itself shards batches by
rank (set ``Trainer(use_distributed_sampler=False)``).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

OPTIONAL_TENSORS = ("depth", "flow", "latent_mean", "latent_logvar", "content")


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples into a batch: ``frames`` (B, F, 3, H, W), ``is_video`` (B,) bool,
    ``caption`` and ``key`` lists, and the ``OPTIONAL_TENSORS`` every sample has. Samples of
    encoded shards may come without frames (their latents say the shape)."""
    shaped = "frames" if "frames" in samples[0] else "latent_mean"
    shapes = {tuple(s[shaped].shape) if shaped in s else None for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch {shaped} of shapes {sorted(map(str, shapes))} (keys "
            f"{[s['key'] for s in samples]}); batches must be all clips or all images of one size"
        )
    batch = {
        "caption": [s["caption"] for s in samples],
        "is_video": torch.tensor([bool(s["is_video"]) for s in samples]),
        "key": [s["key"] for s in samples],
    }
    for name in ("frames", *OPTIONAL_TENSORS):
        present = [name in s for s in samples]
        if all(present):
            batch[name] = torch.stack([s[name] for s in samples])
        elif any(present):
            missing = [s["key"] for s in samples if name not in s]
            raise ValueError(f"'{name}' is missing from some samples of a batch: {missing}")
    return batch


class JointBatchSampler:
    """An endless stream of index batches into ``JointDataset([videos, images])``, each of
    one kind, where batch ``k`` depends only on (seed, k).

    The stream is cut into epochs: an epoch covers the clips once
    (``num_videos // (batch_size * num_replicas)`` steps) plus image steps in the proportion
    ``image_ratio / (1 - image_ratio)``, in an order drawn from (seed, epoch); images come
    from successive random permutations. Every rank draws the same global batches and keeps
    its own slice, so all ranks see the same kind at a step. Iteration starts at
    ``start_step``: a resumed run continues the stream exactly where it stopped, whatever
    the trainer's notion of epochs (the stream has no length; training is bounded by steps).
    With ``with_seeds`` each index comes as ``(index, (seed, step, place))``: the seed of that
    sample's own randomness (clip start, crop), a function of the run's seed, the step and the
    sample's place in the global batch alone.
    """

    def __init__(
        self,
        num_videos: int,
        num_images: int,
        batch_size: int,
        image_ratio: float = 0.0,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_step: int = 0,
        with_seeds: bool = False,
    ) -> None:
        if not 0.0 <= image_ratio <= 1.0:
            raise ValueError(f"image_ratio must be in [0, 1], got {image_ratio}")
        if image_ratio > 0 and num_images == 0:
            raise ValueError("image_ratio > 0 needs an image dataset with at least one image")
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad batch_size {batch_size} or rank {rank} of {num_replicas}")
        self.num_videos, self.num_images, self.batch_size = num_videos, num_images, batch_size
        self.image_ratio, self.seed, self.start_step = image_ratio, seed, start_step
        self.num_replicas, self.rank, self.with_seeds = num_replicas, rank, with_seeds
        global_batch = batch_size * num_replicas
        if image_ratio == 1.0:
            self.video_steps, self.image_steps = 0, num_images // global_batch
        else:
            self.video_steps = num_videos // global_batch
            self.image_steps = round(self.video_steps * image_ratio / (1.0 - image_ratio))
        if self.video_steps + self.image_steps == 0:
            raise ValueError(
                f"{num_videos} clips / {num_images} images make no full batch of {global_batch}"
                f" ({batch_size} per device x {num_replicas} devices)"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.video_steps + self.image_steps

    def epoch_batches(self, epoch: int) -> Iterator[list]:
        """This rank's batches of one epoch of the stream."""
        rng = np.random.default_rng([self.seed, epoch])
        kinds = rng.permutation([0] * self.video_steps + [1] * self.image_steps)
        streams = [_permutations(rng, self.num_videos), _permutations(rng, self.num_images)]
        offsets = [0, self.num_videos]
        global_batch = self.batch_size * self.num_replicas
        first = self.rank * self.batch_size
        for step, kind in enumerate(kinds):
            indices = [next(streams[kind]) + offsets[kind] for _ in range(global_batch)]
            mine = indices[first : first + self.batch_size]
            if self.with_seeds:
                k = epoch * self.steps_per_epoch + step
                yield [(i, (self.seed, k, first + j)) for j, i in enumerate(mine)]
            else:
                yield mine

    def __iter__(self) -> Iterator[list]:
        epoch, skip = divmod(self.start_step, self.steps_per_epoch)
        while True:
            yield from itertools.islice(self.epoch_batches(epoch), skip, None)
            epoch, skip = epoch + 1, 0


class JointDataset(Dataset):
    """Datasets one after the other (as ``ConcatDataset``), indexed by ``JointBatchSampler``'s
    ``(index, seed)`` keys: a dataset with ``getitem_seeded(index, seed)`` draws its sample's
    randomness from that seed; others are indexed plainly."""

    def __init__(self, parts: Sequence[Dataset]) -> None:
        self.parts = list(parts)
        self.ends = list(itertools.accumulate(len(p) for p in self.parts))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, key: int | tuple[int, Sequence[int]]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        part = bisect.bisect_right(self.ends, index)
        local = index - (self.ends[part - 1] if part else 0)
        draw = getattr(self.parts[part], "getitem_seeded", None)
        return draw(local, seed) if draw is not None else self.parts[part][local]


def _permutations(rng: np.random.Generator, size: int) -> Iterator[int]:
    while size:
        yield from (int(i) for i in rng.permutation(size))


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class VideoDataModule(pl.LightningDataModule):
    """Train / val loaders over dataset objects built by Hydra (nested ``_target_``).

    ``image_dataset`` with ``image_ratio`` > 0 adds image batches to training. Shuffling
    follows ``seed`` and the epoch (restored from checkpoints); workers are seeded from a
    generator seeded with ``seed``. ``skipped_files()`` lists unreadable files found so far.
    """

    def __init__(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        image_dataset: Dataset | None = None,
        image_ratio: float = 0.0,
        val_batch_size: int | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__()
        if image_ratio > 0 and image_dataset is None:
            raise ValueError("image_ratio > 0 needs an image_dataset")
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.image_dataset = image_dataset if image_ratio > 0 else None
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.image_ratio, self.prefetch_factor = image_ratio, prefetch_factor
        self.train_sampler: JointBatchSampler | None = None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer else (1, 0)

    def _loader_options(self) -> dict:
        options = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "collate_fn": collate_samples,
            "worker_init_fn": seed_worker,
            "generator": torch.Generator().manual_seed(self.seed),
            "persistent_workers": self.num_workers > 0,
        }
        if self.num_workers > 0:
            options["prefetch_factor"] = self.prefetch_factor
        return options

    def train_dataloader(self) -> DataLoader:
        """Seeded one-kind batches of clips (and images when ``image_ratio`` > 0)."""
        parts = [self.train_dataset] + ([self.image_dataset] if self.image_dataset else [])
        num_replicas, rank = self._world()
        self.train_sampler = JointBatchSampler(
            num_videos=len(self.train_dataset),
            num_images=len(self.image_dataset) if self.image_dataset else 0,
            batch_size=self.batch_size,
            image_ratio=self.image_ratio,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            start_step=self._start_step(),
            with_seeds=True,
        )
        return DataLoader(
            JointDataset(parts), batch_sampler=self.train_sampler, **self._loader_options()
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation in a fixed order (sharded by rank under DDP); [] when there is none."""
        if self.val_dataset is None:
            return []
        num_replicas, rank = self._world()
        sampler = None
        if num_replicas > 1:
            sampler = DistributedSampler(self.val_dataset, num_replicas, rank, shuffle=False)
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            sampler=sampler,
            **self._loader_options(),
        )

    def skipped_files(self) -> dict[str, str]:
        """{path: reason} of every file the datasets skipped (in any worker) so far."""
        found: dict[str, str] = {}
        for dataset in (self.train_dataset, self.val_dataset, self.image_dataset):
            found.update(getattr(dataset, "skipped", {}) or {})
        return found

    def _start_step(self) -> int:
        """Where the batch stream continues: the batches a (restored) trainer has consumed."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches


class SkippedFilesReport(pl.Callback):
    """Logs ``data/skipped_files`` every ``every_n_steps`` and at the end of training, and
    warns once about each newly skipped file."""

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = every_n_steps
        self.reported: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._report(trainer, pl_module, log=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, log=False)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "skipped_files"):
            return
        skipped = datamodule.skipped_files()
        new = {path: reason for path, reason in skipped.items() if path not in self.reported}
        if new:
            listing = ", ".join(f"{path} ({reason})" for path, reason in sorted(new.items()))
            rank_zero_warn(f"{len(skipped)} unreadable files skipped so far; new: {listing}")
            self.reported.update(new)
        if log:
            pl_module.log("data/skipped_files", float(len(skipped)), rank_zero_only=True)
