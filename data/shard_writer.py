"""Writing WebDataset tar shards from a folder or manifest, as a Lightning predict job.

Every rank takes every ``world_size``-th file of the listing; DataLoader workers read
them; ``ShardEncoder.predict_step`` turns a batch into shard samples and ``ShardWriter``
(a prediction writer) appends them to this rank's tar files, ``<kind>-RRR-NNNNN.tar``,
starting a new one every ``samples_per_shard`` samples or ``max_shard_mb``. Rank 0 then
writes the index (``videos.json`` / ``images.json``) that ``data/shards.py`` reads, and
``skipped.json``.

Plain shards hold each file's bytes as they are (``mp4``, ``png``...) plus ``json``
(caption, source path, segment start/end): decoding, random clip starts and crops happen
at training time, and unreadable files are skipped then. Encoded shards (``encode=true``)
hold what the frozen encoders make of one clip per entry (from the segment's start, central
crop, as ``data/encoded.py`` does for the world): ``latent_mean`` / ``latent_logvar`` (the
VAE posterior), ``depth`` (MiDaS, resized to the latent size as the structure input is),
``content`` (CLIP image embedding per frame), all ``.npy`` float16, and ``frames.npy``
(uint8) with ``keep_frames``; files that cannot give a clip are skipped here and listed.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from webdataset import TarWriter

from data.datasets import MediaEntry, read_image
from data.shards import INDEX_FORMAT
from data.video import MediaReadError, parse_size, read_clip

log = logging.getLogger(__name__)

KINDS = ("video", "image")


class ShardJobs(Dataset):
    """One rank's share of the files to shard: ``(kind, entry)`` pairs, every
    ``world_size``-th from ``rank``. Items are shard samples in the making: the file's bytes
    (plain), its decoded clip (``encode``), or the reason it could not be read."""

    def __init__(
        self,
        jobs: list[tuple[str, MediaEntry]],
        encode: bool,
        num_frames: int = 16,
        size: int | list[int] = 256,
        fps: float | None = None,
        stride: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.jobs = list(enumerate(jobs))[rank::world_size]
        self.encode, self.num_frames, self.size = encode, num_frames, parse_size(size)
        self.fps, self.stride = fps, stride

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        number, (kind, entry) = self.jobs[i]
        item = {
            "key": f"{kind[0]}{number:09d}",
            "kind": kind,
            "meta": {"caption": entry.caption, "source": entry.path},
        }
        if entry.start is not None or entry.end is not None:
            item["meta"].update(start=entry.start, end=entry.end)
        try:
            if not self.encode:
                item["ext"] = Path(entry.path).suffix.lower().lstrip(".")
                item["data"] = Path(entry.path).read_bytes()
            elif kind == "image":
                item["frames"] = read_image(entry.path, self.size)
            else:
                item["frames"] = read_clip(
                    entry.path,
                    self.num_frames,
                    self.size,
                    fps=self.fps,
                    stride=self.stride,
                    start=entry.start,
                    end=entry.end,
                ).frames
        except MediaReadError as err:
            item["error"] = err.reason
        except OSError as err:  # a file gone or unreadable since it was listed
            item["error"] = "missing" if isinstance(err, FileNotFoundError) else "unreadable"
        return item


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (read back with ``allow_pickle=False``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class ShardEncoder(pl.LightningModule):
    """Turns items of :class:`ShardJobs` into shard samples; with encoders (``vae``, ``clip``,
    optional ``depth``) runs them on the item's frames, batched."""

    def __init__(self, vae=None, clip=None, depth=None, keep_frames: bool = False) -> None:
        super().__init__()
        self.vae, self.clip, self.depth, self.keep_frames = vae, clip, depth, keep_frames

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[dict]:
        done = [item for item in batch if "error" not in item]
        if self.vae is not None:
            for kind in KINDS:
                group = [item for item in done if item["kind"] == kind]
                if group:
                    self._encode(group)
        return [self._sample(item) for item in batch]

    @torch.no_grad()
    def _encode(self, items: list[dict]) -> None:
        from model.encoders.structure import resize_depth

        frames = torch.stack([item.pop("frames") for item in items]).to(self.device)
        b, f = frames.shape[:2]
        flat = frames.flatten(0, 1)
        moments = [self.vae.moments(chunk) for chunk in flat.split(self.vae.chunk_size)]
        mean, logvar = (torch.cat([m[i] for m in moments]) for i in (0, 1))
        content = self.clip.encode_image(flat)
        arrays = {
            "latent_mean": mean.unflatten(0, (b, f)),
            "latent_logvar": logvar.unflatten(0, (b, f)),
            "content": content.unflatten(0, (b, f)),
        }
        if self.depth is not None:
            depth = self.depth(frames).flatten(0, 1).float()
            arrays["depth"] = resize_depth(depth, mean.shape[-2:]).unflatten(0, (b, f))
        for n, item in enumerate(items):
            item["arrays"] = {k: v[n].cpu().half().numpy() for k, v in arrays.items()}
            if self.keep_frames:
                pixels = ((frames[n] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                item["arrays"]["frames"] = pixels.cpu().numpy()

    def _sample(self, item: dict) -> dict:
        if "error" in item:
            return item
        sample = {"__key__": item["key"], "json": json.dumps(item["meta"]).encode()}
        if "arrays" in item:
            sample.update({f"{k}.npy": npy_bytes(v) for k, v in item["arrays"].items()})
        else:
            sample[item["ext"]] = item["data"]
        return {"kind": item["kind"], "sample": sample}


class ShardWriter(BasePredictionWriter):
    """Appends a rank's samples to its tar shards; rank 0 writes the indexes at the end."""

    def __init__(
        self,
        output: str,
        samples_per_shard: int = 1000,
        max_shard_mb: float = 1000.0,
        info: dict | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output, self.info = Path(output), dict(info or {})
        self.samples_per_shard, self.max_bytes = samples_per_shard, max_shard_mb * 2**20
        self.shards: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        self.skipped: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self.open: dict[str, tuple[TarWriter, Path]] = {}
        self.rank = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank
        self.output.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, *args):
        for item in prediction:
            if "error" in item:
                self.skipped[item["kind"]][item["meta"]["source"]] = item["error"]
                log.warning("skipping %s: %s", item["meta"]["source"], item["error"])
                continue
            self._write(item["kind"], item["sample"])

    def _write(self, kind: str, sample: dict) -> None:
        shards = self.shards[kind]
        size = sum(len(v) for v in sample.values() if isinstance(v, bytes))
        if kind in self.open and (
            shards[-1]["count"] >= self.samples_per_shard
            or shards[-1]["bytes"] + size > self.max_bytes
        ):
            self._close(kind)
        if kind not in self.open:
            name = f"{kind}-{self.rank:03d}-{len(shards):05d}.tar"
            path = self.output / name
            partial = path.with_name(path.name + ".partial")
            self.open[kind] = (TarWriter(str(partial), encoder=False, mtime=0), path)
            shards.append({"url": name, "count": 0, "bytes": 0})
        self.open[kind][0].write(sample)
        shards[-1]["count"] += 1
        shards[-1]["bytes"] += size

    def _close(self, kind: str) -> None:
        writer, path = self.open.pop(kind)
        writer.close()
        os.replace(path.with_name(path.name + ".partial"), path)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for kind in list(self.open):
            self._close(kind)
        gathered = [(self.shards, self.skipped)]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (self.shards, self.skipped))
        if trainer.global_rank != 0:
            return
        skipped = {kind: {p: why for _, found in gathered for p, why in found[kind].items()}
                   for kind in KINDS}  # fmt: skip
        for kind in KINDS:
            shards = [s for ranks, _ in gathered for s in ranks[kind]]
            if shards:
                self.write_index(kind, shards, len(skipped[kind]))
        (self.output / "skipped.json").write_text(json.dumps(skipped, indent=1, sort_keys=True))

    def write_index(self, kind: str, shards: list[dict], skipped: int) -> Path:
        """The index of one kind's shards (sorted by name: rank, then number)."""
        shards = sorted(shards, key=lambda s: s["url"])
        index = {
            "format": INDEX_FORMAT,
            "kind": kind,
            "encoded": bool(self.info.get("encoded")),
            "shards": [{"url": s["url"], "count": s["count"]} for s in shards],
            "info": {**self.info, "samples": sum(s["count"] for s in shards), "skipped": skipped},
        }
        path = self.output / f"{kind}s.json"
        path.write_text(json.dumps(index, indent=1))
        samples = index["info"]["samples"]
        log.info("%s: %d %s samples in %d shards", path, samples, kind, len(shards))
        return path


class ShardJobData(pl.LightningDataModule):
    """The predict DataLoader of this rank's share of ``jobs`` (ranks are known at setup)."""

    def __init__(
        self,
        jobs: list[tuple[str, MediaEntry]],
        encode: bool,
        batch_size: int = 8,
        num_workers: int = 0,
        **clip: object,
    ) -> None:
        super().__init__()
        self.jobs, self.encode, self.clip = jobs, encode, clip
        self.batch_size, self.num_workers = batch_size, num_workers

    def transfer_batch_to_device(self, batch: list[dict], device, dataloader_idx: int):
        """The batch as it is: ``ShardEncoder._encode`` moves the frames itself. Lightning's
        generic mover walks every value, a file's ``bytes`` element by element (3 s per MB:
        shard.py wrote under one clip a second)."""
        return batch

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        share = ShardJobs(self.jobs, self.encode, rank=rank, world_size=world_size, **self.clip)
        return DataLoader(
            share,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_as_list,
            shuffle=False,
        )
