"""Train a Gen-1 model: ``python train.py experiment=tiny [key=value ...]``.

Composes ``configs/train.yaml``, builds the DataModule, the Gen-1 module, callbacks,
loggers and the Trainer, and fits. ``ckpt_path=PATH`` or ``ckpt_path=last`` resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train")


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


def train(cfg: DictConfig) -> pl.Trainer:
    """Fit the configured model on the configured data; returns the finished Trainer."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data.datamodule)
    model = build_model(cfg.model)
    trainer = build_trainer(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.run_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    skipped = datamodule.skipped_files() if hasattr(datamodule, "skipped_files") else {}
    if skipped:
        log.warning("skipped %d unreadable files: %s", len(skipped), ", ".join(sorted(skipped)))
    log.info("finished at step %d; checkpoints in %s/checkpoints", trainer.global_step, cfg.run_dir)
    return trainer


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
