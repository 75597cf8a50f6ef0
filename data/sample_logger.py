"""Validation samples: the first validation clip edited by the model, written as an mp4."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from data.io import write_video
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.training.gen1 import Gen1


class ValidationSamples(pl.Callback):
    """After each validation run, edit the first validation clip with the EMA weights and
    write ``input | output`` side by side to ``<dirpath>/step_NNNNNNN.mp4``; with a
    TensorBoard logger, its first and last frames are logged as images too.

    The content is the CLIP embedding of the clip's first frame (a reconstruction test of
    structure + content conditioning); the structure is its depth (the batch's exact depth
    where it has one, else the model's MiDaS).
    """

    def __init__(
        self,
        dirpath: str,
        steps: int = 10,
        sampler: str = "ddim",
        w: float = 3.0,
        w_t: float = 1.0,
        t_s: int = 0,
        max_frames: int = 8,
        fps: float = 8.0,
        seed: int = 0,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.settings = EditSettings(
            steps=steps,
            sampler=sampler,
            w=w,
            w_t=w_t,
            t_s=t_s,
            window_length=max_frames,
            window_overlap=0,
        )
        self.max_frames, self.fps, self.seed = max_frames, fps, seed
        self.batch: dict | None = None
        self.written: list[Path] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and dataloader_idx == 0:
            self.batch = batch

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.batch is None or not trainer.is_global_zero:
            return
        if not isinstance(pl_module, Gen1):  # e.g. a tiny VAE trainer: nothing to edit
            return
        if isinstance(trainer.strategy, pl.strategies.FSDPStrategy):
            # Sharded weights are whole only inside the module's forward, on every rank.
            rank_zero_warn("trainer=fsdp: no validation sample videos (edit a release instead)")
            self.batch = None
            return
        frames = self.batch["frames"][:1, : self.max_frames]
        depth = self.batch.get("depth")
        depth = depth[:1, : self.max_frames] if depth is not None else None
        generator = torch.Generator().manual_seed(self.seed)
        with pl_module.ema_weights():
            content = pl_module.encode_content(frames[:, 0])
            result = edit_video(
                pl_module, frames, content, self.settings, depth=depth, generator=generator
            )
        side_by_side = torch.cat([frames[0].cpu().float(), result.frames[0]], dim=-1)
        path = self.dirpath / f"step_{trainer.global_step:07d}.mp4"
        write_video(path, side_by_side, fps=self.fps)
        self.written.append(path)
        self.batch = None
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.TensorBoardLogger):
                shown = (side_by_side[[0, -1]] + 1) / 2
                logger.experiment.add_images("val/sample", shown.clamp(0, 1), trainer.global_step)
