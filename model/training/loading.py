"""Gen1 to and from its files: a release or a Lightning checkpoint in, an inference model out;
a training checkpoint in, a release file out.

The file formats themselves (``model.weights.release``) name no class; the only class built
here is ``Gen1``, from a config whose entries must all be ``Gen1`` arguments.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.training.gen1 import Gen1
from model.weights.checkpoint import CheckpointError, load_strict
from model.weights.release import (
    check_plain_config,
    inference_config,
    inference_state,
    is_release,
    read_release,
    read_training_checkpoint,
    write_release,
)


def check_config(config: Any, path: str | Path) -> dict[str, Any]:
    """``config`` if it is a dict of ``Gen1`` arguments holding plain data and no class names."""
    config = check_plain_config(config, path)
    accepted = set(inspect.signature(Gen1.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise CheckpointError(f"{path}: unknown Gen1 config entries {unknown}")
    return config


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a logger's warnings while a model with file-less parts is rebuilt."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_gen1(config: dict, state: Mapping[str, torch.Tensor], path: str | Path) -> Gen1:
    """Gen1 from a checked config and a full inference state dict (strict), in eval mode."""
    config = check_config(config, path)
    if config.get("ema_decay") is not None or config.get("weights"):
        raise CheckpointError(f"{path}: an inference config has no ema_decay and no weights")
    try:
        with _quiet(Gen1.__module__):  # "random weights" warnings: the state dict sets them all
            gen1 = Gen1(**config)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: the model config does not build a Gen1 ({err})") from err
    load_strict(gen1, state, path)
    return gen1.eval().requires_grad_(False)


def release_from_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    use_ema: bool = True,
    sampling: dict[str, Any] | None = None,
) -> str:
    """Training checkpoint -> release file (EMA UNet + frozen parts, fp16); returns sha256.
    ``sampling`` adds to or replaces the editing defaults the release carries."""
    checkpoint, output = Path(checkpoint), Path(output)
    if output.resolve() == checkpoint.resolve():
        raise ValueError(f"the release would overwrite its checkpoint {checkpoint}")
    state, hparams = read_training_checkpoint(checkpoint)
    config = inference_config(hparams)
    if sampling:
        config["sampling"] = {**(config.get("sampling") or {}), **sampling}
    state = inference_state(state, use_ema, checkpoint)
    build_gen1(config, state, checkpoint)  # the release must rebuild: fail here, not later
    extra = {"source_checkpoint": checkpoint.name, "ema": str(use_ema).lower()}
    return write_release(config, state, output, extra_metadata=extra)


def load_gen1(path: str | Path, use_ema: bool = True) -> Gen1:
    """An inference Gen1 (eval, fp32, CPU) from a release file or a Lightning checkpoint; for a
    checkpoint the UNet takes its EMA weights when ``use_ema`` and they exist."""
    path = Path(path)
    if is_release(path):
        config, state = read_release(path)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    else:
        state, hparams = read_training_checkpoint(path)
        config, state = inference_config(hparams), inference_state(state, use_ema, path)
    return build_gen1(config, state, path)
