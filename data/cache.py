"""Caches of what frozen networks make of a dataset: one ``.safetensors`` file of tensors
with captions and sample keys as metadata, under a key that digests everything the
tensors depend on; a file with another key (or unreadable) is rebuilt, never trusted."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from model.weights.atomic import save_safetensors

log = logging.getLogger(__name__)


def plain(cfg: Any) -> Any:
    """A Hydra config node as plain data (resolved); anything else as it is."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def digest(described: dict) -> str:
    """The cache key of a description (plain data) of what a cache depends on."""
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def write_cache(
    path: Path, fmt: str, key: str, tensors: dict[str, torch.Tensor], captions: list, keys: list
) -> None:
    """Write a cache of format ``fmt`` atomically."""
    metadata = {
        "format": fmt,
        "key": key,
        "captions": json.dumps(captions),
        "keys": json.dumps(keys),
    }
    save_safetensors(tensors, path, metadata)


def read_cache(
    path: Path, fmt: str, names: tuple[str, ...]
) -> tuple[str | None, dict[str, torch.Tensor], list, list]:
    """``(key, tensors, captions, keys)`` of a cache file of format ``fmt``; key None when
    there is none, it is of another format, or it cannot be read (a truncated file)."""
    if not path.is_file():
        return None, {}, [], []
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != fmt:
                return None, {}, [], []
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as err:  # a truncated or foreign file: rebuild it
        log.warning("%s: unreadable %s cache (%s); rebuilding it", path, fmt, err)
        return None, {}, [], []
    captions, keys = json.loads(metadata["captions"]), json.loads(metadata["keys"])
    return metadata["key"], tensors, captions, keys
