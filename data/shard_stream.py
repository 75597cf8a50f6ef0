"""Training batches streamed from tar shards (``data=shards``), resumable exactly.

Each rank's DataLoader workers are its lanes (``data/shards.py``): worker ``w`` makes the
batches of steps ``start + w, start + w + W, ...`` (the order in which a DataLoader hands
them out), each all clips or all images as step ``k``'s draw from (seed, k) says, every
sample's random clip start and crop drawn from (seed, k, place in the global batch), as the
folder datasets do. A batch carries its lane's position after it; the DataModule records
the positions of the batches actually trained on and saves them in the checkpoint (gathered
from every rank), so a resumed run continues each lane where it stopped: the same samples
in the same order, whatever was prefetched or skipped before the interruption.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.datamodule import collate_samples
from data.datasets import SkippedMediaWarning
from data.shards import LaneReader, ShardClips
from data.video import MediaReadError


def _built(source: ShardClips | Any | None) -> ShardClips | None:
    """A shard source, instantiated from its config when it is one; None for a config whose
    ``index`` is unset (``data.val`` left null: no validation)."""
    if source is None or isinstance(source, ShardClips):
        return source
    return None if source.get("index", "") is None else instantiate(source)


STATE = ("step", "video_epoch", "video_emitted", "image_epoch", "image_emitted")


def step_is_image(seed: int, step: int, image_ratio: float) -> bool:
    """Whether step ``step`` trains on images: a draw from (seed, step) alone."""
    return image_ratio > 0 and np.random.default_rng([seed, step, 0x1A6E]).random() < image_ratio


class JointShardStream(IterableDataset):
    """Endless one-kind batches of ``batch_size`` samples for one rank (see the module doc).

    ``lane_states`` maps a lane to its recorded ``STATE`` (a resumed run); other lanes start
    at the beginning of the stream.
    """

    def __init__(
        self,
        videos: ShardClips,
        images: ShardClips | None,
        image_ratio: float,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lanes: int = 1,
        start_step: int = 0,
        lane_states: dict[int, list[int]] | None = None,
    ) -> None:
        if image_ratio > 0 and images is None:
            raise ValueError("image_ratio > 0 needs an image shard set")
        self.sources = {"video": videos, "image": images}
        self.image_ratio, self.batch_size, self.seed = image_ratio, batch_size, seed
        self.rank, self.world_size, self.lanes = rank, world_size, lanes
        self.start_step, self.lane_states = start_step, dict(lane_states or {})

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.lanes:
            raise RuntimeError(f"the stream has {self.lanes} lanes but {workers} workers read it")
        step = self.start_step + worker
        lane = step % self.lanes
        state = self.lane_states.get(lane, [0, 0, 0, 0, 0])
        slot, slots = self.rank * self.lanes + lane, self.world_size * self.lanes
        readers = {
            kind: LaneReader(source.index, slot, slots, self.seed, source.shuffle, position)
            for kind, source, position in (
                ("video", self.sources["video"], (state[1], state[2])),
                ("image", self.sources["image"], (state[3], state[4])),
            )
            if source is not None
        }
        while True:
            kind = "image" if step_is_image(self.seed, step, self.image_ratio) else "video"
            first = self.rank * self.batch_size
            samples = [
                self._sample(kind, readers[kind], step, first + j) for j in range(self.batch_size)
            ]
            batch = collate_samples(samples)
            positions = [*readers["video"].position]
            positions += [*readers["image"].position] if "image" in readers else [0, 0]
            batch["stream_state"] = torch.tensor([lane, step, *positions])
            yield batch
            step += self.lanes

    def _sample(self, kind: str, reader: LaneReader, step: int, place: int) -> dict:
        """The next readable sample of a lane, its randomness drawn from (seed, step, place);
        unreadable ones are skipped, warned about once and counted."""
        source = self.sources[kind]
        for _ in range(100 * source.index.total):  # lanes see other shards every epoch
            sample_id, raw = next(reader)
            if source.skips.is_skipped(sample_id):
                if source.skips.all_skipped():
                    break
                continue
            if raw is None:
                reason = "corrupt"
                message = f"{source.index.name(sample_id)}: missing from its shard"
            else:
                rng = np.random.default_rng([self.seed, step, place])
                try:
                    return source.decode(raw, rng)
                except MediaReadError as err:
                    reason, message = err.reason, str(err)
            if source.skips.mark(sample_id, reason):
                warnings.warn(f"skipping {message}", SkippedMediaWarning, stacklevel=2)
        raise RuntimeError(f"no sample of {source.index.location} could be read")


class OrderedShardBatches(IterableDataset):
    """Every sample of a shard set once, in a fixed order, this rank's share (its shards, or
    every ``world_size``-th sample), in batches of ``batch_size`` (validation)."""

    def __init__(self, source: ShardClips, batch_size: int, rank: int = 0, world_size: int = 1):
        self.source, self.batch_size = source, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        reader = LaneReader(self.source.index, self.rank, self.world_size, seed=0, buffer=0)
        samples = []
        for _ in range(len(reader.items)):
            sample_id, raw = next(reader)
            try:
                if raw is not None:
                    samples.append(self.source.decode(raw, None))
            except MediaReadError as err:
                if self.source.skips.mark(sample_id, err.reason):
                    warnings.warn(f"skipping {err}", SkippedMediaWarning, stacklevel=2)
            if len(samples) == self.batch_size:
                yield collate_samples(samples)
                samples = []
        if samples:
            yield collate_samples(samples)


class ShardDataModule(pl.LightningDataModule):
    """Training (and optional validation) batches from shard sets: ``train_dataset`` (clips),
    ``image_dataset`` with ``image_ratio`` > 0 (images), ``val_dataset``, each a
    :class:`ShardClips` or its config (built here, the images only when used);
    ``num_workers`` DataLoader workers per rank are the lanes."""

    def __init__(
        self,
        train_dataset: ShardClips | Any,
        image_dataset: ShardClips | Any | None = None,
        image_ratio: float = 0.0,
        val_dataset: ShardClips | Any | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__()
        if not 0.0 <= image_ratio <= 1.0:
            raise ValueError(f"image_ratio must be in [0, 1], got {image_ratio}")
        if image_ratio > 0 and image_dataset is None:
            raise ValueError("image_ratio > 0 needs an image_dataset")
        self.train_dataset, self.val_dataset = _built(train_dataset), _built(val_dataset)
        self.image_dataset = _built(image_dataset) if image_ratio > 0 else None
        self.image_ratio, self.seed = image_ratio, seed
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.prefetch_factor = (
            num_workers,
            pin_memory,
            prefetch_factor,
        )
        self.lanes = max(1, num_workers)
        self.trained: dict[int, list[int]] = {}  # lane -> STATE of its last trained batch
        self.restored: dict | None = None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer else (1, 0)

    def _start_step(self) -> int:
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer else 0

    def _loader(self, dataset: IterableDataset, workers: int) -> DataLoader:
        options = {"num_workers": workers, "pin_memory": self.pin_memory}
        if workers > 0:
            options.update(persistent_workers=True, prefetch_factor=self.prefetch_factor)
        return DataLoader(dataset, batch_size=None, **options)

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._world()
        start = self._start_step()
        self.trained = self._resumed_states(world_size, rank, start)
        stream = JointShardStream(
            self.train_dataset,
            self.image_dataset,
            self.image_ratio,
            self.batch_size,
            self.seed,
            rank,
            world_size,
            self.lanes,
            start,
            self.trained,
        )
        return self._loader(stream, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        world_size, rank = self._world()
        batches = OrderedShardBatches(self.val_dataset, self.val_batch_size, rank, world_size)
        return self._loader(batches, 0)

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Record the lane position of a batch about to be trained on."""
        if isinstance(batch, dict) and "stream_state" in batch:
            batch = dict(batch)
            lane, *state = batch.pop("stream_state").tolist()
            self.trained[int(lane)] = state
        return batch

    def state_dict(self) -> dict:
        """Every rank's lane positions (a collective under DDP: every rank saves together)."""
        world_size, rank = self._world()
        mine = {int(k): list(v) for k, v in self.trained.items()}
        ranks = [mine]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size > 1 and distributed:
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"world_size": world_size, "lanes": self.lanes, "ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = state_dict

    def _resumed_states(self, world_size: int, rank: int, start: int) -> dict[int, list[int]]:
        """The lane positions to continue from: the checkpoint's when it was made with the same
        ranks and workers; else (warned) every lane from the epoch after the furthest reached."""
        restored = self.restored
        if restored is None:
            if start > 0:
                rank_zero_warn(f"resuming at step {start} without shard positions: from the start")
            return {}
        if (restored["world_size"], restored["lanes"]) == (world_size, self.lanes):
            return {int(k): list(v) for k, v in restored["ranks"][rank].items()}
        states = [s for ranks in restored["ranks"] for s in ranks.values()]
        video = 1 + max((s[1] for s in states), default=-1)
        image = 1 + max((s[3] for s in states), default=-1)
        rank_zero_warn(
            f"the checkpoint streamed with {restored['world_size']} ranks x {restored['lanes']} "
            f"workers, this run has {world_size} x {self.lanes}: not an exact resume; every lane "
            f"starts at video epoch {video}, image epoch {image}"
        )
        return {lane: [0, video, 0, image, 0] for lane in range(self.lanes)}

    def skipped_files(self) -> dict[str, str]:
        """{shard#offset: reason} of every sample skipped (in any worker) so far."""
        found: dict[str, str] = {}
        for source in (self.train_dataset, self.image_dataset, self.val_dataset):
            found.update(source.skipped if source is not None else {})
        return found
