"""Which samples of a shard set failed and why: one byte per sample in shared memory, so
every DataLoader worker of a rank skips what any of them found unreadable."""

from __future__ import annotations

from typing import Protocol

import torch

from data.video import REASONS


class SampleNames(Protocol):
    """What the log needs of a shard set (``data.shards.ShardIndex``)."""

    total: int

    def name(self, sample_id: int) -> str: ...


class ShardSkipLog:
    """Which samples of a shard set failed and why, in shared memory (read by every worker)."""

    def __init__(self, index: SampleNames) -> None:
        self.index = index
        self.codes = torch.zeros(index.total, dtype=torch.uint8).share_memory_()

    def mark(self, sample_id: int, reason: str) -> bool:
        """Record a failed sample; True the first time (when to warn)."""
        if self.codes[sample_id]:
            return False
        self.codes[sample_id] = REASONS.index(reason) + 1
        return True

    def is_skipped(self, sample_id: int) -> bool:
        """Whether sample ``sample_id`` (a global index into the shard set) was skipped."""
        return bool(self.codes[sample_id])

    def all_skipped(self) -> bool:
        """Whether every sample was skipped (nothing left to train on)."""
        return bool(self.codes.all())

    def as_dict(self) -> dict[str, str]:
        """Skipped samples as {"SHARD_URL#KEY": reason}."""
        found = torch.nonzero(self.codes).flatten().tolist()
        return {self.index.name(i): REASONS[int(self.codes[i]) - 1] for i in found}
