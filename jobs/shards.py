"""shard.py's library: list the videos and images, build the frozen encoders (``encode``),
run the writing as a Lightning predict job over the configured devices and nodes.

A config that cannot work (nothing to shard, both or neither of root / manifest, a missing
folder) is refused in one line before any work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data.datasets import IMAGE_EXTENSIONS, MediaEntry, list_folder, read_manifest
from data.encoded import build_encoders
from data.shard_writer import ShardEncoder, ShardJobData, ShardWriter
from data.video import VIDEO_EXTENSIONS
from jobs.training import ConfigError

log = logging.getLogger("shard")

KINDS = {"video": ("videos", VIDEO_EXTENSIONS), "image": ("images", IMAGE_EXTENSIONS)}


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the keys of the first problem found."""
    given = 0
    for key, _ in KINDS.values():
        part = cfg.get(key) or {}
        root, manifest = part.get("root"), part.get("manifest")
        if root is None and manifest is None:
            continue
        if root is not None and manifest is not None:
            raise ConfigError(f"{key} takes one of {key}.root= or {key}.manifest=, not both")
        which, path = ("root", root) if root is not None else ("manifest", manifest)
        if not Path(path).exists():
            raise ConfigError(f"{key}.{which}: {path} does not exist")
        given += 1
    if not given:
        raise ConfigError("nothing to shard: set videos.root=DIR (or videos.manifest=FILE) "
                          "and/or images.root=DIR (or images.manifest=FILE)")  # fmt: skip
    if not cfg.get("output"):
        raise ConfigError("output=DIR is required: where the shards and their index go")


def listing(cfg: DictConfig) -> list[tuple[str, MediaEntry]]:
    """``(kind, entry)`` of every file to shard: videos first, then images, each sorted."""
    jobs = []
    for kind, (key, extensions) in KINDS.items():
        part = cfg.get(key) or {}
        if part.get("root") is not None:
            entries = list_folder(part.root, tuple(e.lower() for e in extensions))
        elif part.get("manifest") is not None:
            entries = read_manifest(part.manifest)
        else:
            continue
        jobs += [(kind, entry) for entry in entries]
    return jobs


def setup(cfg: DictConfig):
    """Check the config, then build ``(data, module, writer, trainer)``."""
    check_config(cfg)
    jobs = listing(cfg)
    clip = {k: cfg[k] for k in ("num_frames", "size", "fps", "stride")}
    info = {
        "encoded": bool(cfg.encode),
        "sources": {key: OmegaConf.to_container(cfg[key]) for key, _ in KINDS.values()},
        **(OmegaConf.to_container(OmegaConf.create(clip)) if cfg.encode else {}),
    }
    module = ShardEncoder()
    if cfg.encode:
        model = OmegaConf.to_container(cfg.model, resolve=True)
        weights = model.get("weights") or {}
        vae_weights = weights.get("vae") or weights.get("sd_checkpoint")
        encoders = {"vae": model["vae"], "vae_weights": vae_weights, "clip": model["clip"]}
        encoders["depth"] = model.get("depth")
        module = ShardEncoder(*build_encoders(**encoders), keep_frames=cfg.keep_frames)
        info["encoders"] = encoders
    data = ShardJobData(jobs, bool(cfg.encode), cfg.batch_size, cfg.num_workers, **clip)
    writer = ShardWriter(cfg.output, cfg.samples_per_shard, cfg.max_shard_mb, info)
    trainer = instantiate(cfg.trainer, callbacks=[writer], logger=False, enable_checkpointing=False)
    return data, module, writer, trainer


def run(cfg: DictConfig) -> dict:
    """Shard as configured; returns ``{kind: {"samples", "shards", "skipped"}}`` (rank 0)."""
    data, module, writer, trainer = setup(cfg)
    trainer.predict(module, datamodule=data, return_predictions=False)
    summary = {}
    if trainer.global_rank == 0:
        for kind in KINDS:
            index = Path(cfg.output) / f"{kind}s.json"
            if index.is_file():
                found = json.loads(index.read_text())
                summary[kind] = {
                    "samples": found["info"]["samples"],
                    "shards": len(found["shards"]),
                    "skipped": found["info"]["skipped"],
                }
                log.info("%s: %s", index, summary[kind])
    return summary
