"""Test helpers: SD configs from configs/, randomised SD-layout checkpoints, key lists."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "reference"  # key layouts of public checkpoint formats


def config(group: str, name: str) -> dict:
    """The constructor arguments of ``configs/model/<group>/<name>.yaml`` (no ``_target_``)."""
    params = yaml.safe_load((ROOT / "configs" / "model" / group / f"{name}.yaml").read_text())
    params.pop("_target_", None)
    return params


def reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a reference layout in ``tests/data/reference/<name>.keys.tsv``
    (``scalar`` for 0-d tensors)."""
    rows = (REFERENCE / f"{name}.keys.tsv").read_text().splitlines()
    pairs = (row.split("\t") for row in rows if row.strip() and not row.startswith("#"))
    return {
        key: () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
        for key, shape in pairs
    }


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a module's state dict."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every float tensor replaced by random values at a scale that keeps activations O(1).

    Norm scales and biases are randomised too, so no mapping error can hide behind a
    zero- or one-initialised layer.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        noise = torch.randn(value.shape, generator=gen)
        if value.ndim >= 2:
            out[key] = noise / value[0].numel() ** 0.5
        elif key.endswith("weight"):
            out[key] = 1.0 + 0.2 * noise
        else:
            out[key] = 0.2 * noise
    return out
