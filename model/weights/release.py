"""The release file format: a trained Gen-1 as one fp16 ``.safetensors`` with its config as JSON.

A release holds what inference needs: the UNet (its EMA weights by default) and the frozen
parts the model is rebuilt with (VAE, CLIP, MiDaS when the model has one), every floating
tensor in fp16, and the model's plain config dict as JSON under the metadata key
``gen1_config``. Reading one uses safetensors and ``json`` only: nothing is unpickled, and a
config that names a class (``_target_``) is refused. Lightning training checkpoints are read
with ``torch.load(weights_only=True)``; pickled objects other than plain data become inert
stand-ins, never the classes they name. Building the model from either lives in
``model.training.loading``; this module knows files and key layouts only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model.weights.atomic import file_sha256, save_safetensors
from model.weights.checkpoint import CheckpointError
from model.weights.pickles import UnsafePickleError, load_data_only

log = logging.getLogger(__name__)

CONFIG_KEY = "gen1_config"
FORMAT_KEY = "format"
FORMAT = "gen1-release/1"
EMA_MODULE = "ema."  # the EMA copy and its update count
EMA_PREFIX = "ema.model."
UNET_PREFIX = "unet."


def _find_target(value: Any, where: str = "config") -> str | None:
    """The path of the first ``_target_`` key inside nested dicts/lists, else None."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "_target_":
                return f"{where}._target_"
            found = _find_target(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_target(item, f"{where}[{i}]")
            if found:
                return found
    return None


def check_plain_config(config: Any, path: str | Path) -> dict[str, Any]:
    """``config`` if it is a dict of plain data that names no class (no ``_target_``)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the model config is a {type(config).__name__}, not a dict")
    target = _find_target(config)
    if target:
        raise CheckpointError(f"{path}: the model config names a class ({target}); refused")
    return config


def _without_targets(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_targets(v) for k, v in value.items() if k != "_target_"}
    if isinstance(value, list):
        return [_without_targets(v) for v in value]
    return value


def inference_config(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A Gen-1 config for rebuilding from a full state dict: no ``_target_``, no weight files
    to load (the state dict has every weight), no EMA copy (the chosen weights are the UNet)."""
    config = _without_targets(json.loads(json.dumps(dict(hparams))))
    config["weights"] = None
    config["ema_decay"] = None
    if isinstance(config.get("clip"), dict):
        config["clip"]["weights"] = None
    if isinstance(config.get("depth"), dict):
        config["depth"]["weights"] = None
    return config


def read_training_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, hyper_parameters)`` of a Lightning checkpoint of ``Gen1``.

    Read as data only (``model.weights.pickles``): objects of classes outside torch's safe
    list (callback states, numpy scalars, paths) become inert placeholders.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = load_data_only(path)
    except UnsafePickleError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except Exception as err:  # zip, pickle and torch errors alike: not a checkpoint we can read
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(data, Mapping) or not isinstance(data.get("state_dict"), Mapping):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    hparams = data.get("hyper_parameters")
    if not isinstance(hparams, Mapping):
        raise CheckpointError(f"{path}: no 'hyper_parameters': not saved by the Gen1 module")
    try:
        hparams = json.loads(json.dumps(dict(hparams)))
    except TypeError as err:
        raise CheckpointError(f"{path}: hyper_parameters hold non-plain data ({err})") from err
    state = {k: v for k, v in data["state_dict"].items() if isinstance(v, torch.Tensor)}
    return state, hparams


def inference_state(
    state: Mapping[str, torch.Tensor], use_ema: bool = True, path: str | Path = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The state of an EMA-less Gen1: the UNet from the EMA copy (``use_ema``, when there is
    one; else the trained weights, with a warning), every other part as it is."""
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    if use_ema and not has_ema:
        log.warning("%s holds no EMA weights: using the trained UNet weights", path)
    take_ema = use_ema and has_ema
    out = {k: v for k, v in state.items() if not k.startswith(EMA_MODULE)}
    if take_ema:
        out = {k: v for k, v in out.items() if not k.startswith(UNET_PREFIX)}
        for key, value in state.items():
            if key.startswith(EMA_PREFIX):
                out[UNET_PREFIX + key[len(EMA_PREFIX) :]] = value
    return out


def read_release(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state)`` of a release file: safetensors and JSON only, nothing unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from err
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path}: not a Gen-1 release (no {CONFIG_KEY!r} metadata; write one with release.py)"
        )
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise CheckpointError(f"{path}: release format {metadata.get(FORMAT_KEY)!r} != {FORMAT!r}")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: {CONFIG_KEY} metadata is not JSON ({err})") from err
    return check_plain_config(config, path), state


def write_release(
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    extra_metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a release (floating tensors cast to ``dtype``) via a temporary file moved into
    place; returns the file's sha256."""
    path = Path(path)
    config = check_plain_config(dict(config), path)
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()
    }
    metadata = {**(extra_metadata or {}), FORMAT_KEY: FORMAT, CONFIG_KEY: json.dumps(config)}
    save_safetensors(tensors, path, metadata)
    return file_sha256(path)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The Gen-1 config of a release (its metadata alone) or of a Lightning checkpoint."""
    path = Path(path)
    if not is_release(path):
        return read_training_checkpoint(path)[1]
    if not path.is_file():
        raise FileNotFoundError(f"release file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return check_plain_config(json.loads(metadata[CONFIG_KEY]), path)
    except CheckpointError:
        raise
    except Exception as err:  # unreadable header, no or bad config: the full read says which
        read_release(path)
        raise CheckpointError(f"{path}: unreadable release config ({err})") from err


def sampling_default(path: str | Path, key: str, default: Any) -> Any:
    """An editing default a checkpoint carries (its config's ``sampling.KEY``), else
    ``default``."""
    return (read_model_config(path).get("sampling") or {}).get(key, default)


def native_resolution(path: str | Path, default: int = 512) -> int:
    """The longest frame side a checkpoint was trained at (its ``sampling.resolution``)."""
    return int(sampling_default(path, "resolution", default))


def default_noise_correlation(path: str | Path) -> float:
    """The frame-noise correlation a checkpoint samples with by default (0: independent)."""
    return float(sampling_default(path, "noise_correlation", 0.0))


def is_release(path: str | Path) -> bool:
    """Whether ``path`` names a release file (by its ``.safetensors`` suffix)."""
    return Path(path).suffix == ".safetensors"
