"""SD weight files on disk: what a file is (``checkpoint_kind``), its keys and shapes read
cheaply (``peek``), the yaml beside it, and writing a single-file SD checkpoint.

``checkpoint_kind`` reads a ``.safetensors`` header (metadata, keys, shapes: no tensor data) or
a torch pickle memory-mapped as data only (``model.weights.pickles``), so a caller can dispatch
to the right loader without reading the weights twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from model.sd.config import SDConfig, write_sd_yaml
from model.weights.atomic import file_sha256, save_safetensors
from model.weights.checkpoint import UNET_PREFIX, CheckpointError
from model.weights.pickles import UnsafePickleError, load_data_only
from model.weights.release import CONFIG_KEY

Kind = Literal["gen1-release", "gen1-lightning", "sd"]
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Peek:
    """A weight file's keys and shapes, its safetensors metadata and, for a Lightning
    checkpoint, the names of its hyper-parameters."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    hparams: frozenset[str] | None = None  # None: not a Lightning checkpoint


def peek(path: str | Path) -> Peek:
    """Keys, shapes and metadata of a weight file without reading its tensors' data.

    Raises ``FileNotFoundError`` or ``CheckpointError`` (unreadable, unsafe pickle, no tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return Peek(path, shapes, dict(f.metadata() or {}))
        data = load_data_only(path)
    except UnsafePickleError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except Exception as err:  # safetensors, torch, zip and pickle each raise their own kind
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    hparams = None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        extra = data.get("hyper_parameters")
        hparams = frozenset(extra) if isinstance(extra, Mapping) else frozenset()
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a state dict")
    shapes = {k: tuple(v.shape) for k, v in data.items() if isinstance(v, torch.Tensor)}
    return Peek(path, shapes, {}, hparams)


def describe_keys(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What a set of keys looks like, in a few words (for one-line refusals)."""
    keys = list(shapes)

    def has(*parts: str) -> bool:
        return any(any(p in k for p in parts) for k in keys)

    if not keys:
        return "no tensors at all"
    if has("conditioner.embedders."):
        return "an SDXL / SGM-format checkpoint (conditioner.embedders.*), not SD 1.x / 2.x"
    if has("double_blocks.", "joint_blocks."):
        return "a diffusion-transformer checkpoint (Flux / SD3 blocks), not an SD UNet"
    if has("lora_down", "lora_up", "lora_A", "lora_B"):
        return "a LoRA (low-rank deltas), not a full checkpoint: load it onto one"
    if has("control_model.", "input_hint_block."):
        return "a ControlNet, not a full SD checkpoint"
    if has("model.diffusion_model."):
        return "an LDM checkpoint whose UNet matches no known SD family"
    if has("input_blocks.0.0.weight") and not has("first_stage_model."):
        return "a bare UNet (no model.diffusion_model. prefix, no VAE, no text encoder)"
    if has("encoder.down.", "decoder.up.") and not has("diffusion_model"):
        return "a standalone VAE (encoder.* / decoder.*), not a full SD checkpoint"
    if has("pretrained.", "scratch."):
        return "a MiDaS depth model (pretrained.* / scratch.*)"
    if has("visual.") and has("token_embedding"):
        return "an open_clip CLIP model (visual.* + text tower)"
    if has("text_model."):
        return "a Hugging Face CLIP text model (text_model.*)"
    if has("unet.") and has("vae."):
        return "a Gen-1 state dict (unet.* / vae.*)"
    return f"{len(keys)} tensors, none in SD's layout (first keys: {', '.join(sorted(keys)[:3])})"


def checkpoint_kind(path: str | Path) -> Kind:
    """What a checkpoint is, from its header or keys (no weights read):

    - ``"gen1-release"``: a ``.safetensors`` written by ``release.py`` (``gen1_config``
      metadata): ``model.training.loading.load_gen1``;
    - ``"gen1-lightning"``: a Lightning checkpoint of the Gen1 module (``unet.*`` keys and
      hyper-parameters): ``load_gen1``;
    - ``"sd"``: an SD single file in the LDM layout (``model.diffusion_model.*``), including
      LDM's and ``SDTrainer``'s Lightning checkpoints: ``model.sd.loading.load_sd``.

    Anything else raises ``CheckpointError`` saying in one line what it looks like.
    """
    info = peek(path)
    if CONFIG_KEY in info.metadata:
        return "gen1-release"
    keys = info.shapes
    if (
        info.hparams is not None
        and {"unet", "clip"} <= info.hparams
        and any(k.startswith("unet.") for k in keys)
    ):
        return "gen1-lightning"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "sd"
    raise CheckpointError(
        f"{path}: neither a Gen-1 release / checkpoint nor an SD single file: it looks like "
        f"{describe_keys(keys)}"
    )


def yaml_beside(path: str | Path) -> Path | None:
    """SD's inference config next to a checkpoint (same stem, ``.yaml`` / ``.yml``: the
    convention of A1111 and ComfyUI), or None."""
    path = Path(path)
    for suffix in YAML_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def write_sd_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    config: SDConfig,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """A single-file SD checkpoint (floating tensors cast to ``dtype``, written atomically) and
    its inference yaml beside it (same stem). Returns the checkpoint's sha256."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an SD checkpoint is written as .safetensors, got {path}")
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    save_safetensors(cast, path, dict(metadata or {}))
    write_sd_yaml(config, path.with_suffix(".yaml"))
    return file_sha256(path)
