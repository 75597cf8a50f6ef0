"""Which layers to prepack on this machine: measured, remembered, and said in one line.

``prepacked_weights(net, calibration=Calibration("UNet"))`` (``model.weights.prepack``) times
each layer plain and prepacked on its first input (the network's first call on real data;
the output is used, so only the slower candidate's time is extra) and keeps the faster. The
choices are cached in one JSON file per machine, ``<cache dir>/prepack/<digest>.json``, whose
digest keys the CPU model, PyTorch's CPU capability (ISA), the PyTorch version and the thread
count; inside it each choice is keyed by the layer (kind, weight shape, stride, padding,
dilation, groups) and its input shape, so a network at a given input shape is calibrated
once per machine and its layers shared with any network that has the same ones. The cache
dir is ``$GEN1_CACHE_DIR``, else ``$XDG_CACHE_HOME/gen1``, else ``~/.cache/gen1``; a file that
cannot be read is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.weights.atomic import atomic_output

try:
    import fcntl
except ImportError:  # not POSIX (Windows): writes are atomic but not locked
    fcntl = None

log = logging.getLogger(__name__)
VERSION = 1


def cache_dir() -> Path:
    """Where gen1 caches what it measures: ``$GEN1_CACHE_DIR``, ``$XDG_CACHE_HOME/gen1`` or
    ``~/.cache/gen1``."""
    if os.environ.get("GEN1_CACHE_DIR"):
        return Path(os.environ["GEN1_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gen1"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict:
    """What a measured choice holds for: CPU model, ISA, PyTorch version, thread count."""
    return {
        "cpu": cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def cache_path(where: dict | None = None, root: Path | None = None) -> Path:
    """The cache file of ``where`` (this machine by default)."""
    where = where or machine()
    digest = hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root or cache_dir()) / "prepack" / f"{digest}.json"


def read_cache(path: Path, where: dict) -> dict:
    """The layer choices in ``path`` for ``where``; empty when missing, unreadable or another's."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") == VERSION and data.get("machine") == where:
            return {k: v for k, v in data["layers"].items() if isinstance(v.get("packed"), bool)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return {}


class Calibration:
    """Choices between plain and prepacked weights for one network's layers: from the cache
    file when it has them, else measured with ``clock`` and added to it.

    ``clock`` defaults to this process's CPU time on one thread (steady on a shared machine),
    wall time on more. ``log`` gets one line per network once its first call is over (the
    first time one of its layers is called again) or at the end of the context.
    """

    def __init__(
        self,
        name: str,
        *,
        root: Path | None = None,
        clock: Callable[[], float] | None = None,
        log: Callable[[str], None] = log.info,
    ) -> None:
        self.name = name
        self.machine = machine()
        self.path = cache_path(self.machine, root)
        single = self.machine["threads"] == 1
        self.clock = clock or (time.process_time if single else time.perf_counter)
        self.log = log
        self.choices = read_cache(self.path, self.machine)
        self.new: dict[str, dict] = {}
        self.logged = False
        self._reset()

    def _reset(self) -> None:
        self.timed = self.cached = self.packed = 0  # layers (a key may serve several)
        self.timed_s = {"plain": 0.0, "best": 0.0}
        self.spent_s = 0.0

    @property
    def pending(self) -> bool:
        """Whether choices were made since the last :meth:`flush`."""
        return bool(self.timed or self.cached)

    def decided(self, key: str) -> bool | None:
        """The known choice for ``key`` (True: packed), or None: measure it."""
        choice = self.choices.get(key)
        if choice is None:
            return None
        self.cached += 1
        self.packed += choice["packed"]
        return choice["packed"]

    def record(self, key: str, plain_s: float, packed_s: float, spent_s: float) -> bool:
        """Remember a measurement of ``key`` (``spent_s`` all it took); True: packed won, by
        more than 3% (within that, plain: the safe side of timing noise)."""
        packed = packed_s < 0.97 * plain_s
        self.choices[key] = self.new[key] = {
            "packed": packed,
            "plain_s": round(plain_s, 6),
            "packed_s": round(packed_s, 6),
        }
        self.timed += 1
        self.packed += packed
        self.timed_s["plain"] += plain_s
        self.timed_s["best"] += min(plain_s, packed_s)
        self.spent_s += spent_s - min(plain_s, packed_s)
        return packed

    def flush(self) -> None:
        """Write new choices to the cache file (merged with what others wrote meanwhile) and
        log one line of what was chosen and what measuring cost (after the first line, only
        when something was measured)."""
        if self.new:
            self.write()
            self.new = {}
        if self.timed or not self.logged:  # later shapes (windows, canvases): only news
            self.log(self.summary())
            self.logged = True
        self._reset()

    def write(self) -> None:
        """Merge the new choices into the file under an exclusive lock: processes calibrating
        at once (a benchmark beside an edit) would otherwise drop each other's choices, and
        the lost layers be timed again, and packed differently, on every run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                layers = {**read_cache(self.path, self.machine), **self.new}
                data = {"version": VERSION, "machine": self.machine, "layers": layers}
                with atomic_output(self.path) as tmp:
                    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        except OSError as err:  # a read-only home: the choices hold for this run only
            log.warning("prepack: cannot write the calibration cache %s: %s", self.path, err)

    def summary(self) -> str:
        total = self.timed + self.cached
        parts = []
        if self.timed:
            parts.append(
                f"{self.timed} timed on their first input (+{self.spent_s:.2f} s; those "
                f"{self.timed_s['plain']:.3f} s plain -> {self.timed_s['best']:.3f} s)"
            )
        if self.cached:
            parts.append(f"{self.cached} as cached")
        return (
            f"prepack=auto: {self.name}: {self.packed} of {total} layers packed; "
            f"{'; '.join(parts)} ({self.path})"
        )
