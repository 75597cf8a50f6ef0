"""WebDataset tar shards of clips and images: the index, each lane's share, a replayable
shuffle, and decoding through the project's one video reader.

A shard set is a list of tar files plus an index (``videos.json`` / ``images.json``, written
by ``shard.py``) naming them with their sample counts. Shards are opened with
``webdataset.gopen``: local paths, ``file:``, ``http(s)://`` and ``pipe:COMMAND`` (e.g.
``pipe:aws s3 cp s3://bucket/x.tar -``); relative names resolve against the index's own
location, or through ``url_format`` (``"pipe:aws s3 cp s3://bucket/{shard} -"``).

Training reads an endless stream per *lane*: a (rank, worker) pair. Each epoch the shards
are permuted from (seed, epoch) and dealt to the ``ranks x workers`` lanes (with fewer
shards than lanes every lane reads every shard and keeps every n-th sample). A lane reads
its shards in order and emits their samples in a local shuffle: sorted by reading position
plus a uniform draw in [0, ``shuffle``), so each sample moves at most ``shuffle`` places and
at most about ``2 x shuffle`` samples wait in memory. Both are functions of (seed, epoch,
lane) alone, so a lane's stream is fixed by its position (epoch, samples emitted): a resumed
run reopens the shards that still hold pending samples and continues exactly.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from webdataset import tariterators
from webdataset.gopen import gopen

from data.datasets import IMAGE_EXTENSIONS, SkipLog, SkippedMediaWarning, read_image
from data.video import VIDEO_EXTENSIONS, MediaReadError, parse_size, read_clip

INDEX_FORMAT = "gen1-shards/1"
VIDEO_EXTS = tuple(e.lstrip(".") for e in VIDEO_EXTENSIONS)
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
ENCODED_ARRAYS = ("latent_mean", "latent_logvar", "depth", "content")
MISSING = None  # a sample its shard never delivered (a truncated or unreadable tar)


@dataclass(frozen=True)
class ShardIndex:
    """A shard set: shard URLs, samples per shard, and what the samples hold."""

    location: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    kind: str  # "video" or "image"
    encoded: bool  # VAE moments, depth and CLIP embeddings instead of media bytes
    info: dict = field(default_factory=dict, compare=False)  # how it was made

    @property
    def total(self) -> int:
        """Samples in all shards of the index."""
        return int(sum(self.counts))

    @property
    def starts(self) -> np.ndarray:
        """The global id of each shard's first sample."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def name(self, sample_id: int) -> str:
        """``url#offset`` of a global sample id (how skipped samples are reported)."""
        shard = int(np.searchsorted(self.starts, sample_id, side="right") - 1)
        return f"{self.urls[shard]}#{sample_id - int(self.starts[shard])}"


def is_local(location: str) -> bool:
    """Whether a location is a plain path (no ``scheme:``)."""
    return "://" not in location and not location.startswith(("pipe:", "file:"))


def shard_url(index_location: str, name: str, url_format: str | None = None) -> str:
    """Where shard ``name`` of an index lies: ``url_format`` filled in, a name that is a URL or
    an absolute path as it is, else beside the index."""
    if url_format:
        return url_format.format(shard=name)
    if not is_local(name) or os.path.isabs(name):
        return name
    if index_location.startswith("pipe:"):
        raise ValueError(
            f"index {index_location} lists relative shard names: set url_format to say where "
            "they are (e.g. 'pipe:aws s3 cp s3://bucket/shards/{shard} -')"
        )
    base = index_location.rsplit("/", 1)[0] if "/" in index_location else "."
    return f"{base}/{name}"


def read_index(location: str, url_format: str | None = None) -> ShardIndex:
    """The index at ``location`` (a path or any URL ``webdataset.gopen`` opens)."""
    location = str(location)
    if is_local(location) and not Path(location).is_file():
        raise FileNotFoundError(f"shard index {location} does not exist (write it with shard.py)")
    with gopen(location, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"shard index {location} is not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{location}: not a shard index of format {INDEX_FORMAT}")
    shards = data["shards"]
    if not shards or any(int(s["count"]) < 0 for s in shards):
        raise ValueError(f"{location}: lists no shards")
    return ShardIndex(
        location=location,
        urls=tuple(shard_url(location, s["url"], url_format) for s in shards),
        counts=tuple(int(s["count"]) for s in shards),
        kind=data["kind"],
        encoded=bool(data["encoded"]),
        info=data.get("info", {}),
    )


def lane_items(index: ShardIndex, epoch: int, seed: int, slot: int, slots: int) -> np.ndarray:
    """Global ids of the samples lane ``slot`` of ``slots`` reads in ``epoch``, in reading
    order: shards permuted from (seed, epoch), dealt to the lanes (or, with fewer shards than
    lanes, every shard read by every lane, which keeps every ``slots``-th sample from an
    offset drawn per epoch: so every lane sees other samples each epoch, and a lane whose
    share holds only unreadable samples finds readable ones in the next)."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    order = rng.permutation(len(index.counts))
    starts = index.starts
    if len(order) >= slots:
        mine = order[slot::slots]
        return np.concatenate([np.arange(starts[s], starts[s] + index.counts[s]) for s in mine])
    every = np.concatenate([np.arange(starts[s], starts[s] + index.counts[s]) for s in order])
    return every[(slot + int(rng.integers(slots))) % slots :: slots]


def local_shuffle(count: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Reading positions in emission order: sorted by position + U(0, buffer)."""
    if buffer <= 1:
        return np.arange(count)
    return np.argsort(np.arange(count) + rng.random(count) * buffer, kind="stable")


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one tar shard in order (``__key__`` plus one bytes entry per file)."""
    streams = tariterators.url_opener([{"url": url}])
    files = tariterators.tar_file_expander(streams)
    yield from tariterators.group_by_keys(files)


class LaneReader:
    """One lane's endless stream of ``(sample id, raw sample or MISSING)`` from a position.

    ``position`` is ``(epoch, emitted)``: the samples of that epoch already handed out, in
    emission order. Shards are opened as the pending samples need them, so resuming reopens
    only the shards whose samples are still waiting.
    """

    def __init__(
        self,
        index: ShardIndex,
        slot: int,
        slots: int,
        seed: int,
        buffer: int,
        position: tuple[int, int] = (0, 0),
    ) -> None:
        self.index, self.slot, self.slots = index, slot, slots
        self.seed, self.buffer = seed, buffer
        self._start_epoch(*position)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, samples emitted in it): where a resumed reader starts."""
        return self.epoch, self.emitted

    def _start_epoch(self, epoch: int, emitted: int) -> None:
        items = lane_items(self.index, epoch, self.seed, self.slot, self.slots)
        if len(items) == 0:
            raise ValueError(
                f"{self.index.location}: {self.index.total} samples cannot feed "
                f"{self.slots} lanes (ranks x workers): use fewer workers or more samples"
            )
        rng = np.random.default_rng([self.seed, epoch, self.slot, 0x5F1])
        self.items, self.order = items, local_shuffle(len(items), self.buffer, rng)
        self.when = np.empty(len(items), np.int64)
        self.when[self.order] = np.arange(len(items))
        self.epoch, self.emitted = epoch, min(emitted, len(items))
        if self.emitted == len(items):
            self._start_epoch(epoch + 1, 0)
            return
        self.pending: dict[int, dict | None] = {}
        first = int(self.order[self.emitted :].min())  # the earliest reading position needed
        self.shards = self._shards_from(first)

    def _shards_from(self, first: int) -> Iterator[tuple[int, dict | None]]:
        """``(reading position, sample or MISSING)`` of this epoch's items from ``first``."""
        starts, items = self.index.starts, self.items
        shard_of = np.searchsorted(starts, items, side="right") - 1
        run_ends = [*(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(items)]
        position = first
        while position < len(items):
            shard = int(shard_of[position])
            end = next(e for e in run_ends if e > position)  # this shard's items end there
            wanted = {int(items[p]) - int(starts[shard]): p for p in range(position, end)}
            try:
                for offset, sample in enumerate(shard_samples(self.index.urls[shard])):
                    p = wanted.pop(offset, None)
                    if p is not None:
                        yield p, sample
                    if not wanted:
                        break
            except Exception as err:  # a truncated or unreachable shard: the rest is missing
                warnings.warn(
                    f"shard {self.index.urls[shard]} broke off ({err}); "
                    f"{len(wanted)} of its samples are skipped",
                    SkippedMediaWarning,
                    stacklevel=2,
                )
            for p in sorted(wanted.values()):
                yield p, MISSING
            position = end

    def __iter__(self) -> LaneReader:
        return self

    def __next__(self) -> tuple[int, dict | None]:
        while self.emitted not in self.pending:
            p, sample = next(self.shards, (None, None))
            if p is None:
                raise RuntimeError(f"lane {self.slot}: sample {self.emitted} was never read")
            if self.when[p] >= self.emitted:  # earlier ones went out before an interruption
                self.pending[int(self.when[p])] = sample
        sample = self.pending.pop(self.emitted)
        sample_id = int(self.items[self.order[self.emitted]])
        self.emitted += 1
        if self.emitted == len(self.items):
            self._start_epoch(self.epoch + 1, 0)
        return sample_id, sample


def _extension(sample: dict, choices: tuple[str, ...]) -> str | None:
    return next((ext for ext in choices if ext in sample), None)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardClips:
    """Samples of a shard set of media files, decoded as the folder datasets decode them:
    ``num_frames`` frames at ``fps`` (or ``stride``) of a video, or an image as a 1-frame
    clip, resized and cropped to ``size`` (random start and crop when ``train``).

    A sample that cannot be decoded raises :class:`MediaReadError`; the stream skips it and
    counts it in ``skips``. ``shuffle`` is the shuffle window of the training stream.
    """

    carries_depth = False  # samples hold no depth (MiDaS makes it); jobs.training checks it
    encoded = False

    def __init__(
        self,
        index: str,
        num_frames: int = 8,
        size: int | list[int] = 256,
        fps: float | None = None,
        stride: int | None = None,
        train: bool = True,
        shuffle: int = 1000,
        url_format: str | None = None,
    ) -> None:
        self.index = read_index(index, url_format)
        if self.index.encoded != self.encoded:
            held = "encoded samples" if self.index.encoded else "media files"
            fix = "data=shards_encoded" if self.index.encoded else "data=shards"
            raise ValueError(f"shard index {index} holds {held}: use {fix}")
        self.num_frames, self.size = num_frames, parse_size(size)
        self.fps, self.stride, self.train, self.shuffle = fps, stride, train, shuffle
        self.skips = SkipLog(self.index.total, self.index.name)

    def first_readable(self) -> dict:
        """The first sample of the set that decodes, read here (a training run checks its
        data with it before any worker starts). ``RuntimeError`` naming the set and why its
        samples failed when none does."""
        reader = LaneReader(self.index, 0, 1, seed=0, buffer=0)
        first_failure = None
        for _ in range(self.index.total):
            sample_id, raw = next(reader)
            try:
                if raw is None:
                    raise MediaReadError(self.index.name(sample_id), "corrupt", "not in its shard")
                return self.decode(raw, np.random.default_rng([0, sample_id]))
            except MediaReadError as err:
                first_failure = first_failure or str(err)
        raise RuntimeError(
            f"none of the {self.index.total} samples of {self.index.location} could be read "
            f"(first: {first_failure})"
        )

    @property
    def skipped(self) -> dict[str, str]:
        """Samples skipped so far (in this process), as {"SHARD_URL#KEY": reason}."""
        return self.skips.as_dict()

    def decode(self, sample: dict, rng: np.random.Generator | None) -> dict:
        """A training sample (``frames`` in [-1, 1], ``caption``, ``is_video``, ``key``)."""
        meta = json.loads(sample.get("json", b"{}") or b"{}")
        name = f"{sample.get('__url__', '?')}#{sample['__key__']}"
        key = meta.get("source") or name
        name = f"{key} in {name}" if key != name else name
        ext = _extension(sample, VIDEO_EXTS + IMAGE_EXTS)
        if ext is None:
            raise MediaReadError(name, "unreadable", "no media file in the sample")
        with _media_file(sample[ext], ext) as path:
            try:
                rng = rng if self.train else None
                if ext in IMAGE_EXTS:
                    frames, is_video = read_image(path, self.size, rng), False
                else:
                    clip = read_clip(
                        path,
                        self.num_frames,
                        self.size,
                        fps=self.fps,
                        stride=self.stride,
                        start=meta.get("start"),
                        end=meta.get("end"),
                        rng=rng,
                    )
                    frames, is_video = clip.frames, self.num_frames > 1
                    key = f"{key}#{clip.indices[0]}"
            except MediaReadError as err:
                raise MediaReadError(name, err.reason, err.detail) from err
        caption = meta.get("caption", "")
        return {"frames": frames, "caption": caption, "is_video": is_video, "key": key}


class EncodedShardClips(ShardClips):
    """Samples of a shard set with the frozen encoders' outputs (``shard.py encode=true``):
    ``latent_mean`` / ``latent_logvar`` (F, C, h, w), ``depth`` (F, 1, h, w) at the latent
    size, ``content`` (F, D), and ``frames`` when the shards kept them. A clip longer than
    ``num_frames`` gives a window of it (at random when ``train``)."""

    carries_depth = True
    encoded = True

    def decode(self, sample: dict, rng: np.random.Generator | None) -> dict:
        """A training sample: the arrays of a window of ``num_frames`` frames (float32),
        ``caption``, ``is_video``, ``key``; :class:`MediaReadError` for missing or broken
        arrays, or a clip shorter than the window."""
        meta = json.loads(sample.get("json", b"{}") or b"{}")
        name = f"{sample.get('__url__', '?')}#{sample['__key__']}"
        try:
            arrays = {n: _npy(sample[f"{n}.npy"]) for n in ENCODED_ARRAYS}
            if "frames.npy" in sample:
                arrays["frames"] = _npy(sample["frames.npy"])
        except (KeyError, ValueError, OSError) as err:
            raise MediaReadError(name, "corrupt", f"bad encoded arrays ({err})") from err
        frames = arrays["latent_mean"].shape[0]
        wanted = 1 if self.index.kind == "image" else min(self.num_frames, frames)
        if frames < wanted:
            raise MediaReadError(name, "too_short", f"{frames} frames, {wanted} wanted")
        start = int(rng.integers(0, frames - wanted + 1)) if rng is not None and self.train else 0
        out = {n: torch.from_numpy(a[start : start + wanted]).float() for n, a in arrays.items()}
        if "frames" in out:
            out["frames"] = out["frames"] / 127.5 - 1.0
        key = f"{meta.get('source') or name}@{start}"
        return {**out, "caption": meta.get("caption", ""), "is_video": wanted > 1, "key": key}


class _media_file:
    """A sample's media bytes as a temporary file (the readers take paths), removed after."""

    def __init__(self, data: bytes, ext: str) -> None:
        self.data, self.ext = data, ext
        shm = Path("/dev/shm")
        self.folder = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None

    def __enter__(self) -> str:
        handle, self.path = tempfile.mkstemp(suffix=f".{self.ext}", dir=self.folder)
        with os.fdopen(handle, "wb") as f:
            f.write(self.data)
        return self.path

    def __exit__(self, *exc) -> None:
        os.unlink(self.path)
