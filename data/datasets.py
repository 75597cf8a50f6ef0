"""Map-style datasets of video clips and images (as 1-frame videos) from a folder or manifest.

A file that cannot give a sample is skipped: warned about once, recorded in the dataset's
:class:`SkipLog` (shared with DataLoader worker processes, so the main process can report
it), and replaced by the next readable entry, so one bad file never ends a run.

Manifests are CSV (with a header) or JSONL with a ``path`` column/key (relative to the
manifest's folder or absolute) and optional ``caption``, ``start`` and ``end`` (seconds).
In a folder, a caption is read from a ``.txt`` file of the same name beside the media file.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.images import load_image
from data.video import (
    REASONS,
    VIDEO_EXTENSIONS,
    MediaReadError,
    cover_size,
    crop_offsets,
    parse_size,
    read_clip,
    uint8_to_unit,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SkippedMediaWarning(UserWarning):
    """Warned once for each file a dataset skips."""


@dataclass(frozen=True)
class MediaEntry:
    """One file of a dataset, with its caption and the segment (seconds) to draw from."""

    path: str
    caption: str = ""
    start: float | None = None
    end: float | None = None


def list_folder(root: str | Path, extensions: Sequence[str]) -> list[MediaEntry]:
    """Files under ``root`` (recursive, sorted) with one of ``extensions``; .txt captions."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    entries = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in extensions and path.is_file():
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text().strip() if sidecar.is_file() else ""
            entries.append(MediaEntry(str(path), caption))
    if not entries:
        raise ValueError(f"no files with extensions {tuple(extensions)} under {root}")
    return entries


def read_manifest(manifest: str | Path) -> list[MediaEntry]:
    """Entries of a CSV or JSONL manifest; relative paths are resolved from its folder."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="") as f:
            rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]
    elif manifest.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(manifest.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{manifest}, line {number}: not JSON ({err})") from err
    else:
        raise ValueError(f"manifest {manifest} must end in .csv or .jsonl")
    entries = [_manifest_entry(manifest, number, row) for number, row in rows]
    if not entries:
        raise ValueError(f"manifest {manifest} lists no files")
    return entries


def _manifest_entry(manifest: Path, number: int, row: object) -> MediaEntry:
    where = f"{manifest}, line {number}"
    if not isinstance(row, dict) or not row.get("path"):
        raise ValueError(f"{where}: every entry needs a 'path'")
    path = Path(row["path"])
    path = path if path.is_absolute() else manifest.parent / path

    def seconds(key: str) -> float | None:
        value = row.get(key)
        if value is None or value == "":
            return None
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: '{key}' must be seconds, got {value!r}") from err

    start, end = seconds("start"), seconds("end")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"{where}: 'end' ({end}) must be after 'start' ({start})")
    return MediaEntry(str(path), str(row.get("caption") or ""), start, end)


class SkipLog:
    """Which of ``count`` entries failed to read and why: one byte each in shared memory, so
    what one DataLoader worker finds unreadable every worker skips. ``name_of(i)`` names
    entry ``i`` in reports (a file path, a shard sample)."""

    def __init__(self, count: int, name_of: Callable[[int], str]) -> None:
        self.name_of = name_of
        self.codes = torch.zeros(count, dtype=torch.uint8).share_memory_()

    def mark(self, index: int, reason: str) -> bool:
        """Record entry ``index`` as skipped; True the first time (when to warn)."""
        if self.codes[index]:
            return False
        self.codes[index] = REASONS.index(reason) + 1
        return True

    def is_skipped(self, index: int) -> bool:
        """Whether entry ``index`` is known to be unreadable."""
        return bool(self.codes[index])

    def all_skipped(self) -> bool:
        """Whether every entry was skipped (nothing left to train on)."""
        return bool(self.codes.all())

    def as_dict(self) -> dict[str, str]:
        """{name: reason} of every skipped entry."""
        found = torch.nonzero(self.codes).flatten().tolist()
        return {self.name_of(i): REASONS[int(self.codes[i]) - 1] for i in found}

    def __len__(self) -> int:
        return int(torch.count_nonzero(self.codes))


class _MediaDataset(Dataset):
    """Entries plus skip-and-replace logic; subclasses implement ``load``."""

    carries_depth = (
        False  # samples hold 'depth' (none: MiDaS must make it); jobs.training checks it
    )

    train = False  # subclasses: True draws random starts and crops

    def __init__(self, root: str | None, manifest: str | None, extensions: Sequence[str]):
        if (root is None) == (manifest is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of root= or manifest=")
        self.source = str(root if root is not None else manifest)
        self.entries = list_folder(root, extensions) if root else read_manifest(manifest)
        paths = [e.path for e in self.entries]
        self.skips = SkipLog(len(paths), paths.__getitem__)

    @property
    def skipped(self) -> dict[str, str]:
        """{path: reason} of the files skipped so far, in this process and its workers."""
        return self.skips.as_dict()

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, entry: MediaEntry, rng: np.random.Generator | None) -> dict:
        raise NotImplementedError

    def random_generator(
        self, seed: Sequence[int] | None, position: int
    ) -> np.random.Generator | None:
        """The randomness of reading entry ``position``: None outside training; in training a
        generator of (``seed``, ``position``), where ``seed`` is the sampler's (run seed, step,
        place in the batch), so a resumed run draws the same clip starts and crops as an
        uninterrupted one; without a seed, a draw from torch's (per-worker) RNG."""
        if not self.train:
            return None
        if seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ())))
        return np.random.default_rng([*seed, position])

    def getitem_seeded(self, index: int, seed: Sequence[int] | None) -> dict:
        """Sample ``index`` (or, if its file cannot be read, the next readable entry), its
        randomness drawn from ``seed`` (see ``random_generator``)."""
        for offset in range(len(self.entries)):
            position = (index + offset) % len(self.entries)
            if self.skips.is_skipped(position):
                continue
            try:
                return self.load(self.entries[position], self.random_generator(seed, position))
            except MediaReadError as err:
                if self.skips.mark(position, err.reason):
                    warnings.warn(f"skipping {err}", SkippedMediaWarning, stacklevel=2)
        raise RuntimeError(
            f"none of the {len(self.entries)} files of {self.source} could be read: {self.skipped}"
        )

    def first_readable(self) -> dict:
        """The first entry that gives a sample, read here (a training run checks its data
        with it before any worker starts; unreadable entries found on the way are skipped
        for the workers too). ``RuntimeError`` naming the files and why when none does."""
        return self.getitem_seeded(0, (0,))

    def __getitem__(self, index: int) -> dict:
        return self.getitem_seeded(index, None)


class VideoClipDataset(_MediaDataset):
    """Clips of ``num_frames`` frames at ``fps`` (or ``stride``) from a folder or manifest.

    ``train=True``: random start and random crop per read; ``train=False``: the clip starts
    at the segment's start with a central crop. ``key`` is ``"<path>#<first frame index>"``.
    """

    def __init__(
        self,
        root: str | None = None,
        manifest: str | None = None,
        num_frames: int = 8,
        size: int | Sequence[int] = 256,
        fps: float | None = None,
        stride: int | None = None,
        train: bool = True,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        num_threads: int = 1,
    ) -> None:
        if fps is not None and stride is not None:
            raise ValueError("VideoClipDataset: give either fps or stride, not both")
        super().__init__(root, manifest, tuple(e.lower() for e in extensions))
        self.num_frames, self.size = num_frames, parse_size(size)
        self.fps, self.stride, self.train, self.num_threads = fps, stride, train, num_threads

    def load(self, entry: MediaEntry, rng: np.random.Generator | None) -> dict:
        clip = read_clip(
            entry.path,
            self.num_frames,
            self.size,
            fps=self.fps,
            stride=self.stride,
            start=entry.start,
            end=entry.end,
            rng=rng,
            num_threads=self.num_threads,
        )
        return {
            "frames": clip.frames,
            "caption": entry.caption,
            "is_video": self.num_frames > 1,
            "key": f"{entry.path}#{clip.indices[0]}",
        }


def read_image(
    path: str | Path, size: tuple[int, int], rng: np.random.Generator | None = None
) -> torch.Tensor:
    """An image as a (1, 3, H, W) clip in [-1, 1]: upright, any Pillow mode (as
    :func:`data.images.load_image` reads it), resized to cover ``size``, then cropped."""
    rgb = Image.fromarray(load_image(path, "RGB"))
    height, width = cover_size((rgb.height, rgb.width), size)
    resized = np.array(rgb.resize((width, height), Image.Resampling.BICUBIC))
    top, left = crop_offsets((height, width), size, rng)
    return uint8_to_unit(resized[None, top : top + size[0], left : left + size[1]])


class ImageDataset(_MediaDataset):
    """Images from a folder or manifest as 1-frame videos; random crop when ``train``."""

    def __init__(
        self,
        root: str | None = None,
        manifest: str | None = None,
        size: int | Sequence[int] = 256,
        train: bool = True,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__(root, manifest, tuple(e.lower() for e in extensions))
        self.size, self.train = parse_size(size), train

    def load(self, entry: MediaEntry, rng: np.random.Generator | None) -> dict:
        frames = read_image(entry.path, self.size, rng)
        return {"frames": frames, "caption": entry.caption, "is_video": False, "key": entry.path}
