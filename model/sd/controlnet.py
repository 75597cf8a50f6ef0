"""ControlNet files as users have them, loaded strictly into ``model.nets.controlnet``.

Two layouts:

- the original one (``cldm``): a ``.pth`` / ``.ckpt`` / ``.safetensors`` whose keys start
  with ``control_model.`` (lllyasviel's ``control_sd15_*`` / ``control_v11*`` files, which may
  also hold a whole SD model: only ``control_model.*`` is read) or hold the ControlNet's keys
  bare (``time_embed.0.weight``..., e.g. the SD 2.x ones of thibaud/controlnet-sd21);
- diffusers' one: ``diffusion_pytorch_model.safetensors`` (or ``.bin``) beside its
  ``config.json``, or the folder holding them.

The architecture is the base checkpoint's UNet (a ControlNet is made for one base model) with
the hint's channels and widths read from the file; diffusers' ``config.json`` is checked
against the base. A key that is missing, unexpected or misshapen raises ``CheckpointError``
naming the file and the keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model.nets.controlnet import ControlNet
from model.sd.diffusers_names import encoder_names, rename_keys
from model.weights.checkpoint import CheckpointError, load_strict, read_state_dict

ORIGINAL_PREFIX = "control_model."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_files(path: str | Path) -> tuple[Path, Path] | None:
    """``(weights, config.json)`` when ``path`` is a ControlNet in diffusers' layout (the
    folder, or its weights file with ``config.json`` beside it), else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        return None
    if path.is_dir():
        weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: a diffusers folder without {DIFFUSERS_WEIGHTS[0]}")
        return weights, folder / "config.json"
    return (path, folder / "config.json") if path.name in DIFFUSERS_WEIGHTS else None


def original_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ControlNet's own keys of an original-layout file (``control_model.`` stripped)."""
    state = read_state_dict(path)
    prefixed = {
        k[len(ORIGINAL_PREFIX) :]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)
    }
    if prefixed:
        return prefixed
    if "input_hint_block.0.weight" in state:
        return state
    raise CheckpointError(
        f"{path} is not a ControlNet: no control_model.* keys and no input_hint_block "
        f"(keys start with {sorted({k.split('.')[0] for k in state})[:5]})"
    )


def hint_widths(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """The hint embedding's widths and input channels, from ``input_hint_block.*`` shapes."""
    convs = sorted(
        (int(k.split(".")[1]), v.shape)
        for k, v in state.items()
        if k.startswith("input_hint_block.") and k.endswith(".weight")
    )
    if not convs:
        raise CheckpointError("no input_hint_block weights")
    # convs: in -> w0, then per width step (w, w) and (w, next); the last is the zero conv
    widths = [convs[0][1][0]] + [shape[0] for _, shape in convs[2:-1:2]]
    return tuple(int(w) for w in widths), int(convs[0][1][1])


def diffusers_params(config: dict[str, Any]) -> dict[str, Any]:
    """The ``in_channels``, ``hint_channels`` and ``hint_widths`` of a diffusers
    ``ControlNetModel`` config."""
    return {
        "in_channels": int(config.get("in_channels", 4)),
        "hint_channels": int(config.get("conditioning_channels", 3)),
        "hint_widths": tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
    }


def controlnet_names(net: ControlNet) -> dict[str, str]:
    """cldm -> diffusers module names of a ControlNet: the UNet encoder's
    (``model.sd.diffusers_names``), the hint embedding (``controlnet_cond_embedding``) and the
    zero convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``)."""
    names = encoder_names(net)
    count = len(net.input_hint_block) // 2  # convs in the hint block: 0, 2, ..., 2 count
    names["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
    for i in range(1, count):
        names[f"input_hint_block.{2 * i}"] = f"controlnet_cond_embedding.blocks.{i - 1}"
    names[f"input_hint_block.{2 * count}"] = "controlnet_cond_embedding.conv_out"
    for i in range(len(net.zero_convs)):
        names[f"zero_convs.{i}.0"] = f"controlnet_down_blocks.{i}"
    names["middle_block_out.0"] = "controlnet_mid_block"
    return names


def diffusers_to_original(state: dict, net: ControlNet, path: Path) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``ControlNetModel`` state dict to cldm's names."""
    renamed, unmatched = rename_keys(state, controlnet_names(net))
    if unmatched:
        raise CheckpointError(
            f"{path} does not fit ControlNet: {len(unmatched)} unexpected keys: "
            + ", ".join(unmatched[:5])
        )
    return renamed


def load_controlnet(path: str | Path, base_unet: dict[str, Any]) -> ControlNet:
    """The ControlNet at ``path`` (either layout) for a base model whose UNet was built from
    ``base_unet`` (``UNet`` keyword arguments, e.g. ``StableDiffusion.config.unet``), in
    float32 on the CPU, in eval mode. Raises ``FileNotFoundError`` for a missing path and
    ``CheckpointError`` (naming the file and keys) for one that does not fit the base."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ControlNet file not found: {path}")
    params = {k: v for k, v in base_unet.items() if k not in ("temporal", "content_dim")}
    diffusers = diffusers_files(path)
    if diffusers is not None:
        weights, config_path = diffusers
        config = json.loads(config_path.read_text())
        net = ControlNet(**(params | diffusers_params(config)))
        state = diffusers_to_original(read_state_dict(weights), net, weights)
        path = weights
    else:
        state = original_state(path)
        widths, channels = hint_widths(state)
        in_channels = state.get("input_blocks.0.0.weight")
        if in_channels is not None:  # a ControlNet reads the plain latents (4), not extras
            params["in_channels"] = int(in_channels.shape[1])
        net = ControlNet(hint_channels=channels, hint_widths=widths, **params)
    load_strict(net, state, path)
    return net.eval()
