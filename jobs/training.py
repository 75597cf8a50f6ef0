"""train.py's library: check a composed training config, build the DataModule, the module and
the Trainer from it, and fit.

A config that cannot work (a structure-conditioned model with no depth estimator on data that
carries no depth, a missing data folder, image batches without images, a GPU trainer without
a GPU, a missing checkpoint to resume) is refused in one line naming the keys, before any
dataset is listed or model built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train")


class ConfigError(ValueError):
    """A training config that cannot work, reported to the user as one line."""


def build_model(model_cfg: DictConfig) -> pl.LightningModule:
    """The LightningModule of ``model_cfg``, given plain containers (kept as hyper-parameters)."""
    params = OmegaConf.to_container(model_cfg, resolve=True)
    cls = get_class(params.pop("_target_"))
    return cls(**params)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """``last`` -> ``<run_dir>/checkpoints/last.ckpt``; a missing file is an error."""
    if ckpt_path is None:
        return None
    path = Path(run_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}")
    return str(path)


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The Trainer with the configured callbacks and loggers."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def _datasets(datamodule: DictConfig) -> dict[str, DictConfig]:
    """The dataset configs a DataModule config trains on (train and, when used, images)."""
    found = {"train_dataset": datamodule.get("train_dataset")}
    if (datamodule.get("image_ratio") or 0) > 0:
        found["image_dataset"] = datamodule.get("image_dataset")
    return found


def _carries_depth(dataset: DictConfig) -> bool:
    """Whether a dataset's samples carry depth (the class says so in ``carries_depth``)."""
    target = dataset.get("_target_")
    return bool(target) and bool(getattr(get_class(target), "carries_depth", False))


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the keys of the first problem found."""
    datamodule = cfg.data.datamodule
    for name, dataset in _datasets(datamodule).items():
        if dataset is None:
            raise ConfigError(
                f"data.datamodule.image_ratio={datamodule.image_ratio} needs "
                f"data.datamodule.{name} (images: data=images_and_videos data.image_root=DIR)"
            )
        if "index" in dataset:  # shards: data.videos / data.images name their indexes
            index = dataset.get("index")
            key = "data.images" if name == "image_dataset" else "data.videos"
            if index is None:
                raise ConfigError(f"data.datamodule.{name} needs {key}=DIR/{key[5:]}.json "
                                  "(an index written by shard.py)")  # fmt: skip
            if "://" not in str(index) and not str(index).startswith(("pipe:", "file:")):
                if not Path(index).is_file():
                    raise ConfigError(f"{key}: {index} does not exist (write it with shard.py)")
        if "root" in dataset and "manifest" in dataset:
            root, manifest = dataset.get("root"), dataset.get("manifest")
            if (root is None) == (manifest is None):
                raise ConfigError(
                    f"data.datamodule.{name} needs exactly one of root= or manifest= "
                    "(data.root=DIR or data.manifest=FILE.csv|jsonl)"
                )
            given = Path(root if root is not None else manifest)
            if not given.exists():
                key = "root" if root is not None else "manifest"
                raise ConfigError(f"data.datamodule.{name}.{key}: {given} does not exist")
    model = cfg.model
    has_structure = "unet" in model and "vae" in model
    if has_structure:  # a Gen-1 config: input channels beyond the latents are structure
        has_structure = model.unet.get("in_channels", 4) > model.vae.get("embed_dim", 4)
    if has_structure and model.get("depth") is None:
        without = [n for n, d in _datasets(datamodule).items() if not _carries_depth(d)]
        if without:
            raise ConfigError(
                f"model.depth is null, so structure comes from the batch's depth, but "
                f"data.datamodule.{without[0]} ({datamodule[without[0]]._target_}) carries no "
                "depth: set model.depth={name: midas_tiny, weights: "
                "bundle/tiny_world/midas_tiny.safetensors} (or another MiDaS)"
            )
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible: "
            "use trainer=cpu (or trainer.accelerator=cpu)"
        )
    resolve_ckpt_path(cfg.get("ckpt_path"), cfg.run_dir)


def check_data(datamodule) -> None:
    """Read one sample of each training source here, before the model is built or a worker
    starts, so data that cannot give a single sample (every clip too short for
    ``num_frames`` x ``stride``, every file corrupt) is one line, not a worker's traceback."""
    for name in ("train_dataset", "image_dataset"):
        probe = getattr(getattr(datamodule, name, None), "first_readable", None)
        if probe is None:
            continue
        try:
            probe()
        except RuntimeError as err:
            hint = ""
            if "too short" in str(err) or "too_short" in str(err):
                hint = "; shorter clips need a smaller data.stride or data.num_frames"
            raise ConfigError(f"data.datamodule.{name}: {err}{hint}") from None


def setup(cfg: DictConfig):
    """Check the config, then build ``(datamodule, module, trainer, ckpt_path)``."""
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data.datamodule)
    check_data(datamodule)
    model = build_model(cfg.model)
    trainer = build_trainer(cfg)
    return datamodule, model, trainer, resolve_ckpt_path(cfg.get("ckpt_path"), cfg.run_dir)


def fit(cfg: DictConfig, datamodule, model: pl.LightningModule, trainer: pl.Trainer, ckpt_path):
    """Fit, then report skipped files and where the checkpoints are; returns the Trainer."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    skipped = datamodule.skipped_files() if hasattr(datamodule, "skipped_files") else {}
    if skipped:
        log.warning("skipped %d unreadable files: %s", len(skipped), ", ".join(sorted(skipped)))
    log.info("finished at step %d; checkpoints in %s/checkpoints", trainer.global_step, cfg.run_dir)
    return trainer


def train(cfg: DictConfig) -> pl.Trainer:
    """Check, build and fit the configured model on the configured data."""
    return fit(cfg, *setup(cfg))


def config_error_line(err: Exception) -> str | None:
    """The one line to show for a config refused while setting up, or None for anything else
    (bugs keep their traceback). Hydra wraps constructor errors; their cause is the message."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, ConfigError | FileNotFoundError | ValueError):
        return str(err).strip().splitlines()[0]
    return None
