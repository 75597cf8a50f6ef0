"""infer.py's ControlNet units: ``controlnet=[{file, hint, scale, start, end}, ...]``.

Checked in one line before any compute (the files exist, the hint is one we make or a file,
the numbers are in range, an SD checkpoint); hint files are read with the other inputs; the
ControlNets are loaded for the checkpoint's UNet and their hints made from the frames (MiDaS
depth, Canny, HED soft edges) a chunk of frames at a time, once for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data.media import MediaError, SourceVideo, read_hint
from jobs.editing.request import InferError
from model.editing.pipeline import video_depth
from model.editing.precision import cast_for_inference
from model.encoders.hed import load_hed, softedge_hint
from model.encoders.hints import CANNY_THRESHOLDS, canny_hint, depth_hint
from model.sd.control import Control, ControlUnit
from model.sd.controlnet import load_controlnet
from model.weights.checkpoint import CheckpointError

HINTS = ("depth", "canny", "softedge")
UNIT_KEYS = {"file", "hint", "scale", "start", "end", "low", "high"}


def units_of(cfg: DictConfig) -> list[dict]:
    """The ``controlnet`` units as plain dicts with their defaults filled in."""
    raw = OmegaConf.to_container(cfg.controlnet, resolve=True) if cfg.controlnet else []
    if isinstance(raw, dict):
        raw = [raw]
    units = []
    for i, unit in enumerate(raw):
        if not isinstance(unit, dict) or "file" not in unit:
            raise InferError(
                f"controlnet[{i}] must be {{file: CONTROLNET, hint: depth|canny|softedge|FILE, "
                f"scale: 1.0}}, got {unit!r}"
            )
        unknown = set(unit) - UNIT_KEYS
        if unknown:
            raise InferError(f"controlnet[{i}]: unknown keys {sorted(unknown)}; known: "
                             f"{sorted(UNIT_KEYS)}")  # fmt: skip
        low, high = CANNY_THRESHOLDS
        defaults = {
            "hint": "depth",
            "scale": 1.0,
            "start": 0.0,
            "end": 1.0,
            "low": low,
            "high": high,
        }
        units.append(defaults | unit)
    return units


def check_control_request(cfg: DictConfig, kind: str) -> None:
    """Every unit's file exists, its hint is ``depth``, ``canny``, ``softedge`` (with ``hed``
    set) or an existing file, its numbers in range; units only with an SD checkpoint."""
    units = units_of(cfg)
    if units and kind != "sd":
        raise InferError(
            f"controlnet=... needs a Stable Diffusion checkpoint; {cfg.checkpoint} is a Gen-1 one"
        )
    for i, unit in enumerate(units):
        where = f"controlnet[{i}]"
        if not Path(unit["file"]).exists():
            raise InferError(f"{where}: ControlNet file not found: {unit['file']}")
        hint = str(unit["hint"])
        if hint not in HINTS and not Path(hint).is_file():
            raise InferError(
                f"{where}: hint must be {', '.join(HINTS)} or a hint file (image, video, .npy); "
                f"no such file: {hint}"
            )
        if hint == "softedge" and not cfg.hed:
            raise InferError(f"{where}: hint softedge needs hed=ControlNetHED.pth")
        if hint == "softedge" and not Path(cfg.hed).is_file():
            raise InferError(f"hed={cfg.hed}: HED weights not found")
        if float(unit["scale"]) < 0:
            raise InferError(f"{where}: scale must be >= 0, got {unit['scale']}")
        if not 0.0 <= float(unit["start"]) < float(unit["end"]) <= 1.0:
            raise InferError(
                f"{where}: start/end must satisfy 0 <= start < end <= 1, got "
                f"{unit['start']}, {unit['end']}"
            )
        if not 0 <= int(unit["low"]) < int(unit["high"]):
            raise InferError(f"{where}: canny thresholds need 0 <= low < high")


def read_hint_files(cfg: DictConfig, source: SourceVideo, indices: list[int], size, geometry):
    """The hints given as files, by unit index: ``(1, F, 3, H, W)`` in [0, 1] at the working
    size (padded as the frames are)."""
    files = {}
    for i, unit in enumerate(units_of(cfg)):
        if str(unit["hint"]) not in HINTS:
            try:
                files[i] = geometry.pad(read_hint(unit["hint"], source, indices, size))
            except MediaError as err:
                raise InferError(f"controlnet[{i}]: {err}") from err
    return files


def make_hint(kind: str, unit: dict, frames: torch.Tensor, depth, hed, chunk: int) -> torch.Tensor:
    """The hint ``(1, F, 3, H, W)`` of ``frames`` ``(1, F, 3, H, W)`` in [-1, 1]."""
    flat = frames[0]
    if kind == "depth":
        return depth_hint(depth[0].float())[None]
    if kind == "canny":
        return canny_hint(flat, int(unit["low"]), int(unit["high"]))[None]
    parts = [softedge_hint(hed, flat[s : s + chunk]) for s in range(0, len(flat), chunk)]
    return torch.cat(parts)[None]


@dataclass
class ControlNets:
    """The edit's ControlNets, loaded once: ``control`` makes the ``Control`` (each unit with
    its hint) of any frames of the edit, all of them or a window's."""

    units: list[tuple[dict, torch.nn.Module, str]]  # (its request, the net, its label)
    hed: torch.nn.Module | None
    chunk_size: int

    def control(
        self, model, frames: torch.Tensor, depth, estimator, files: dict, positions: list[int]
    ) -> Control:
        """Units with their hints for ``frames`` ``(1, n, 3, H, W)`` in [-1, 1], which are the
        edit's frames at ``positions``: depth hints from ``depth`` ``(1, n, 1, H, W)`` (None:
        MiDaS now), canny / soft edges from the frames, hint ``files`` (by unit) sliced; a
        hint kind is made once and shared by its units."""
        made: dict[tuple, torch.Tensor] = {}
        built = []
        for i, (unit, net, label) in enumerate(self.units):
            kind = str(unit["hint"])
            if kind not in HINTS:
                hint = files[i][:, positions]
            else:
                key = (kind, unit["low"], unit["high"]) if kind == "canny" else (kind,)
                if key not in made:
                    if kind == "depth" and depth is None:
                        depth = video_depth(model, frames, estimator, self.chunk_size)
                    made[key] = make_hint(kind, unit, frames, depth, self.hed, self.chunk_size)
                hint = made[key]
            built.append(ControlUnit(net, hint, float(unit["scale"]), float(unit["start"]),
                                     float(unit["end"]), label))  # fmt: skip
        return Control(tuple(built))


def control_units(
    cfg: DictConfig, model, inputs, estimator, device, dtype=None
) -> ControlNets | None:
    """The edit's ControlNets (None without units), loaded for the model's UNet on
    ``device``; ``InferError`` for a file that does not load or fit, or a depth hint with
    no MiDaS to make it."""
    units = units_of(cfg)
    if not units:
        return None
    kinds = {str(u["hint"]) for u in units}
    if "depth" in kinds and inputs.depth is None and estimator is None and model.depth is None:
        raise InferError(
            "hint depth needs a MiDaS: set midas.name=NAME midas.weights=FILE (or depth=FILE)"
        )
    hed = load_hed(cfg.hed).to(device) if "softedge" in kinds else None
    loaded = []
    for unit in units:
        try:
            net = load_controlnet(unit["file"], model.config.unet).to(device)
        except (CheckpointError, FileNotFoundError) as err:
            raise InferError(str(err)) from err
        if net.hint_factor != model.vae.downsample_factor:
            raise InferError(
                f"{unit['file']}: its hint embedding downsamples by {net.hint_factor}, the "
                f"checkpoint's VAE by {model.vae.downsample_factor}"
            )
        if dtype is not None:
            cast_for_inference(net, dtype)
        loaded.append((unit, net, f"{Path(unit['file']).name} ({unit['hint']})"))
    return ControlNets(loaded, hed, cfg.chunk_size)


def describe_control(cfg: DictConfig) -> list[dict]:
    """The units as the sidecar records them (files resolved)."""
    return [{**unit, "file": str(Path(unit["file"]).resolve())} for unit in units_of(cfg)]
