"""Recognising an SD checkpoint that comes without its yaml, from its keys and shapes.

Known families (the public checkpoints' inference configs, as ``SDConfig``): SD 1.x
(``v1-inference.yaml``), SD 2.x (``v2-inference.yaml`` / ``v2-inference-v.yaml``), SD 2-depth
(``v2-midas-inference.yaml``) and the 9-channel inpainting models of both generations
(``v1-inpainting-inference.yaml``, ``v2-inpainting-inference.yaml``). A family is told by the
text encoder's keys (``cond_stage_model.transformer.*``: SD 1.x's CLIP ViT-L/14;
``cond_stage_model.model.*``: SD 2.x's OpenCLIP ViT-H/14), the cross-attention width (768 /
1024) and the UNet's input channels (4 / 5 with ``depth_model.*`` / 9).

eps or v for SD 2.x cannot be read from keys. The rule here is ComfyUI's
(``comfy/supported_models.py``, ``SD20.model_type``): a 4-channel SD 2.x UNet is v-prediction
when the standard deviation of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds
0.09 (the 768-v models' fine-tuning moved that bias; the 512 eps models' stays near zero);
depth and inpainting models are eps. diffusers decides by the ``global_step`` a ``.ckpt``
stores (875000: SD 2.0-base, eps; anything else v), which misreads 2.1-base and every
``.safetensors``; A1111 runs the UNet once on a test input. A yaml beside the file, or an
explicit ``parameterization``, overrides the rule (``model.sd.loading.load_sd``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch

from model.encoders.depth import SD_DEPTH_PREFIX
from model.sd.config import IN_CHANNELS, SDConfig
from model.sd.files import describe_keys
from model.weights.checkpoint import UNET_PREFIX, CheckpointError

SD_VAE = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}
_UNET_COMMON = {
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": 1,
    "use_checkpoint": False,
}
SD1_UNET = {**_UNET_COMMON, "num_heads": 8, "context_dim": 768, "use_linear_in_transformer": False}
SD2_UNET = {
    **_UNET_COMMON,
    "num_head_channels": 64,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
}
V_STATISTIC_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_STATISTIC_THRESHOLD = 0.09
_IN_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
_CROSS_ATTN = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_PROJ_IN = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"
_NAMES = {
    ("sd1", "text"): "SD 1.x",
    ("sd2", "text"): "SD 2.x",
    ("sd2", "depth"): "SD 2-depth",
    ("sd1", "inpaint"): "SD 1.x inpainting",
    ("sd2", "inpaint"): "SD 2.x inpainting",
}


def family_name(config: SDConfig) -> str:
    """A short name of the family of ``config`` ("SD 1.x", "SD 2-depth", ...)."""
    return _NAMES.get((config.text_kind, config.conditioning), "SD")


def text_kind_of(keys) -> str | None:
    """ "sd1" / "sd2" by the text encoder's keys, else None."""
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return None


def v_statistic(state: Mapping[str, torch.Tensor]) -> float | None:
    """ComfyUI's v-prediction statistic of a full SD 2.x UNet (None if absent or not real)."""
    tensor = state.get(UNET_PREFIX + V_STATISTIC_KEY)
    if tensor is None or tensor.is_meta:
        return None
    return float(tensor.float().std(unbiased=False))


def _shape(state: Mapping, key: str) -> tuple[int, ...] | None:
    value = state.get(key)
    return None if value is None else tuple(value.shape)


def recognise(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> SDConfig:
    """The :class:`SDConfig` of a full-size SD checkpoint from its keys and shapes.

    ``state`` maps the file's keys to tensors (meta tensors will do, except for SD 2.x's eps/v
    rule, which then says eps). Raises ``CheckpointError`` saying in one line what the file
    looks like when it is none of the known families.
    """
    conv, attn, proj = (_shape(state, k) for k in (_IN_CONV, _CROSS_ATTN, _PROJ_IN))
    kind = text_kind_of(state)
    if conv is None or attn is None or proj is None or kind is None:
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: it looks like {describe_keys(state)}"
        )
    in_channels, model_channels, context = conv[1], conv[0], attn[1]
    conditioning = {c: n for n, c in IN_CHANNELS.items()}.get(in_channels)
    linear = len(proj) == 2
    expected = {"sd1": (768, False), "sd2": (1024, True)}[kind]
    has_depth = any(k.startswith(SD_DEPTH_PREFIX) for k in state)
    known = (
        model_channels == 320
        and (context, linear) == expected
        and conditioning is not None
        and (conditioning == "depth") == has_depth
        and not (conditioning == "depth" and kind == "sd1")
    )
    if not known:
        text = {"sd1": "CLIP ViT-L/14 (SD 1.x)", "sd2": "OpenCLIP (SD 2.x)"}[kind]
        raise CheckpointError(
            f"{path}: an LDM checkpoint of no known SD family (UNet: {in_channels} input "
            f"channels, {model_channels} base channels, cross-attention {context}, "
            f"{'linear' if linear else 'conv'} projections; text: {text}"
            f"{'; a MiDaS depth model' if has_depth else ''}): put its inference yaml beside "
            "it (same stem, .yaml) or pass config="
        )
    unet = copy.deepcopy(SD1_UNET if kind == "sd1" else SD2_UNET)
    unet["in_channels"] = in_channels
    parameterization, rule = "eps", "eps (SD 1.x)"
    if kind == "sd2":
        rule = "eps (SD 2 depth / inpainting models are eps)"
        if conditioning == "text":
            statistic = v_statistic(state)
            if statistic is not None and statistic > V_STATISTIC_THRESHOLD:
                parameterization = "v"
            shown = "n/a" if statistic is None else f"{statistic:.3f}"
            rule = f"{parameterization} (std of {V_STATISTIC_KEY} = {shown}, threshold 0.09)"
    config = SDConfig(
        unet=unet,
        vae=copy.deepcopy(SD_VAE),
        text_kind=kind,
        text_arch="ViT-H-14" if kind == "sd2" else None,
        clip_skip=1 if kind == "sd1" else 2,
        parameterization=parameterization,
        conditioning=conditioning,
        depth_model="dpt_hybrid_384" if conditioning == "depth" else None,
        image_size=96 if parameterization == "v" else 64,
    )
    source = f"recognised from keys: {family_name(config)}, {rule}"
    return SDConfig(**{**config.to_dict(), "source": source})
