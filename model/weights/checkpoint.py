"""Reading weight files safely and loading them strictly, by key, into our modules.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``: no class named
inside a file is ever instantiated. Loading is strict: every missing, unexpected or
misshapen key is an error that names the file and the keys. Two mismatches are expected
and reported instead: layers this project adds to SD (temporal layers, the content
projection), which keep their initialisation, and extra UNet input channels (structure),
which are zero-filled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from model.weights.pickles import UnsafePickleError, load_data_only

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Parameters this project adds to an SD UNet; an SD file lacks them and they keep their init.
NEW_UNET_KEYS = re.compile(r"(^|\.)temporal\.|^context_proj\.")
INPUT_CONV = "input_blocks.0.0.weight"


class CheckpointError(ValueError):
    """A weight file that cannot be read, or whose keys do not fit the model."""


@dataclass
class LoadReport:
    """What a strict load did besides copying tensors."""

    path: str
    loaded: int = 0
    initialised: list[str] = field(default_factory=list)
    zero_filled: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.path}: loaded {self.loaded} tensors"]
        if self.initialised:
            parts.append(f"initialised {len(self.initialised)} new ({_sample(self.initialised)})")
        if self.zero_filled:
            parts.append(f"zero-filled extra input channels of {', '.join(self.zero_filled)}")
        return "; ".join(parts)


def _sample(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` or torch checkpoint file, unwrapped from ``state_dict``.

    Non-tensor objects in a torch checkpoint (Lightning callbacks, hyper-parameters) are
    read as inert placeholders, never as the classes they name (``model.weights.pickles``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        data = load_data_only(path)
    except UnsafePickleError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except Exception as err:  # torch, pickle, zip and safetensors each raise their own kind
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def select(
    state: Mapping[str, torch.Tensor],
    prefix: str,
    path: str | Path,
    use_ema: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, without it; a file holding only bare keys is taken whole.

    With ``use_ema`` each tensor comes from LDM's EMA copy, stored as ``model_ema.`` plus the
    dotless name (``model_ema.diffusion_modelinput_blocks00weight``).
    """
    keys = [k for k in state if k.startswith(prefix)]
    if not keys:
        return dict(state)
    out = {k[len(prefix) :]: state[k] for k in keys}
    if use_ema:
        ema_prefix = "model_ema." + prefix.split(".", 1)[1].replace(".", "")
        missing = [k for k in out if ema_prefix + k.replace(".", "") not in state]
        if missing:
            raise CheckpointError(
                f"{path}: use_ema asked for, but {len(missing)} EMA tensors are absent "
                f"({_sample(missing)})"
            )
        out = {k: state[ema_prefix + k.replace(".", "")] for k in out}
    return out


def check_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    new_keys: re.Pattern | None = None,
    expandable: Iterable[str] = (),
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """``load_strict``'s checks without copying: ``(report, state to load)``, or the error.

    Works on a module built on the meta device (only its keys and shapes are read).
    """
    report = LoadReport(str(path))
    target = module.state_dict()
    state = dict(state)
    missing = [k for k in target if k not in state]
    report.initialised = [k for k in missing if new_keys is not None and new_keys.search(k)]
    missing = [k for k in missing if k not in report.initialised]
    unexpected = [k for k in state if k not in target]
    misshapen = []
    for key in set(state) & set(target):
        have, want = state[key].shape, target[key].shape
        if have == want:
            continue
        if key in expandable and len(have) == len(want) and have[1] < want[1]:
            if have[:1] == want[:1] and have[2:] == want[2:]:
                grown = torch.zeros(want, dtype=state[key].dtype)
                grown[:, : have[1]] = state[key]
                state[key] = grown
                report.zero_filled.append(f"{key} ({have[1]} -> {want[1]})")
                continue
        misshapen.append(f"{key} (file {tuple(have)}, model {tuple(want)})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_sample(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_sample(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} keys with wrong shapes: {_sample(misshapen)}")
    if problems:
        raise CheckpointError(
            f"{path} does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    return report, state


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    new_keys: re.Pattern | None = None,
    expandable: Iterable[str] = (),
) -> LoadReport:
    """Copy ``state`` into ``module``; any mismatch not explained below raises, naming ``path``.

    Model keys matching ``new_keys`` may be absent from the file (they keep their init);
    keys in ``expandable`` may have fewer input channels (dim 1) than the model: the
    rest are zero-filled.
    """
    report, state = check_strict(module, state, path, new_keys, expandable)
    module.load_state_dict(state, strict=False)
    report.loaded = len(state)
    if report.zero_filled:
        log.warning("%s: zero-filled extra input channels: %s", path, report.zero_filled)
    if report.initialised:
        log.info(
            "%s: %d parameters not in the file keep their initialisation",
            path,
            len(report.initialised),
        )
    return report


def load_sd_unet(unet: nn.Module, path: str | Path, use_ema: bool = False) -> LoadReport:
    """Load the UNet of an SD checkpoint (full file or bare UNet keys) into ``unet``."""
    state = select(read_state_dict(path), UNET_PREFIX, path, use_ema)
    return load_strict(unet, state, path, new_keys=NEW_UNET_KEYS, expandable=[INPUT_CONV])


def load_sd_vae(vae: nn.Module, path: str | Path) -> LoadReport:
    """Load the VAE of an SD checkpoint (or a standalone VAE file) into ``vae``."""
    state = select(read_state_dict(path), VAE_PREFIX, path)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    return load_strict(vae, state, path)
