"""What an SD checkpoint is: its architecture and sampling facts, read from SD's own inference
``.yaml`` (``v1-inference.yaml``, ``v2-inference-v.yaml``, ``v2-midas-inference.yaml``,
``v1-inpainting-inference.yaml``...) or written as one.

The yaml's ``model.params`` give ``unet_config.params`` (the UNet's keyword arguments),
``first_stage_config.params`` (the VAE), ``cond_stage_config`` (``FrozenCLIPEmbedder``: SD 1.x's
text encoder; ``FrozenOpenCLIPEmbedder``: SD 2.x's, with its ``layer``), ``parameterization``
("v" for SD 2.x 768-v; absent means eps), ``depth_stage_config`` (SD 2-depth's MiDaS),
``scale_factor``, ``linear_start`` / ``linear_end`` / ``timesteps`` (the scaled-linear beta
schedule) and ``conditioning_key`` ("hybrid" for the concatenated inputs of depth and
inpainting models). Facts follow the ldm code (``ldm/models/diffusion/ddpm.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.diffusion.schedule import DiscreteSchedule, check_parameterization
from model.nets.unet import UNet
from model.weights.checkpoint import CheckpointError

CONDITIONINGS = ("text", "depth", "inpaint")
# model.target's class -> conditioning, and back (the ldm class an SD yaml names).
MODEL_TARGETS = {
    "text": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "depth": "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion",
    "inpaint": "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
}
TEXT_TARGETS = {
    "sd1": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "sd2": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}
# The UNet input channels of each conditioning: latents, + depth, + mask and masked latents.
IN_CHANNELS = {"text": 4, "depth": 5, "inpaint": 9}
# ldm.modules.midas.api model types -> model.encoders.depth names.
MIDAS_TYPES = {
    "dpt_hybrid": "dpt_hybrid_384",
    "dpt_large": "dpt_large_384",
    "midas_v21_small": "midas_v21_small_256",
    "midas_tiny": "midas_tiny",  # the tiny world's MiDaS (this project's; not an ldm type)
}
TEXT_LAYERS = {"last": 1, "penultimate": 2}  # FrozenOpenCLIPEmbedder's layer -> clip_skip
_UNET_ARGS = set(inspect.signature(UNet.__init__).parameters) - {"self", "sd_params"}
_UNET_IGNORED = {"image_size", "use_fp16", "use_bf16", "legacy", "use_spatial_transformer"}


@dataclass(frozen=True)
class SDConfig:
    """One SD checkpoint's architecture and sampling facts.

    ``unet``: ``UNet`` keyword arguments; ``vae``: ``{"embed_dim", "ddconfig"}``;
    ``text_kind`` "sd1" / "sd2" with ``text_arch`` (open_clip model name of an SD 2.x tower,
    which fixes its head count) and ``clip_skip`` (1: last layer, 2: penultimate);
    ``conditioning`` "text", "depth" (+ MiDaS ``depth_model``) or "inpaint";
    ``image_size`` the latent side it was trained at; ``source`` says where this came from.
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_kind: str = "sd1"
    text_arch: str | None = None
    clip_skip: int = 1
    parameterization: str = "eps"
    scale_factor: float = 0.18215
    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    conditioning: str = "text"
    depth_model: str | None = None
    image_size: int | None = None
    source: str = field(default="", compare=False)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along a side (8 for SD's VAE)."""
        return 2 ** (len(self.vae["ddconfig"]["ch_mult"]) - 1)

    @property
    def native_resolution(self) -> int | None:
        """The frame side (pixels) the model was trained at: 512 for SD 1.x, 768 for 2.x-v."""
        return None if self.image_size is None else self.image_size * self.downsample_factor

    def schedule(self) -> DiscreteSchedule:
        """The discrete DDPM schedule (ldm's "linear" betas are SD's scaled-linear ones)."""
        return DiscreteSchedule(self.num_timesteps, self.linear_start, self.linear_end)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for sidecars and logs)."""
        return asdict(self)


def _class_name(target: object) -> str:
    return str(target or "").rsplit(".", 1)[-1]


def _get(mapping: Any, *keys: str, where: str) -> Any:
    value = mapping
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise CheckpointError(f"{where}: no {'.'.join(keys)}")
        value = value[key]
    return value


def read_sd_yaml(path: str | Path) -> dict[str, Any]:
    """The parsed yaml at ``path`` (plain data; ``CheckpointError`` naming it if unreadable)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable yaml file ({err})") from err
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: not an SD inference config (a mapping with 'model')")
    return dict(data)


def _unet_params(params: Mapping, where: str) -> dict[str, Any]:
    unknown = sorted(set(params) - _UNET_ARGS - _UNET_IGNORED)
    if unknown:
        raise CheckpointError(f"{where}: unet_config.params has unsupported entries {unknown}")
    if params.get("num_classes") is not None or params.get("adm_in_channels") is not None:
        raise CheckpointError(
            f"{where}: a class- or image-embedding-conditioned UNet (num_classes / "
            "adm_in_channels: unCLIP, upscaler) is not a text-to-image SD model"
        )
    out = {k: v for k, v in params.items() if k in _UNET_ARGS}
    out["use_checkpoint"] = False  # a training setting; inference never checkpoints
    return out


def config_from_yaml(data: Mapping[str, Any], source: str = "<yaml>") -> SDConfig:
    """The :class:`SDConfig` of a parsed SD inference yaml; ``CheckpointError`` (naming
    ``source`` and the entry) for what is missing, unsupported or inconsistent."""
    params = _get(data, "model", "params", where=source)
    target = _class_name(_get(data, "model", "target", where=source))
    by_class = {_class_name(t): c for c, t in MODEL_TARGETS.items()}
    if target not in by_class:
        raise CheckpointError(
            f"{source}: model.target {target!r} is not an SD text-to-image, depth or "
            f"inpainting model (supported: {', '.join(sorted(by_class))})"
        )
    conditioning = by_class[target]
    unet = _unet_params(_get(params, "unet_config", "params", where=source), source)
    first_stage = _get(params, "first_stage_config", "params", where=source)
    vae = {"embed_dim": int(first_stage["embed_dim"]), "ddconfig": dict(first_stage["ddconfig"])}
    cond_stage = _get(params, "cond_stage_config", where=source)
    text_class = _class_name(cond_stage.get("target"))
    kinds = {_class_name(t): k for k, t in TEXT_TARGETS.items()}
    if text_class not in kinds:
        raise CheckpointError(
            f"{source}: cond_stage_config.target {text_class!r} is not SD's text encoder "
            f"(supported: {', '.join(sorted(kinds))})"
        )
    text_kind = kinds[text_class]
    text_params = dict(cond_stage.get("params") or {})
    layer = text_params.get("layer", "last" if text_kind == "sd1" else "penultimate")
    if layer not in TEXT_LAYERS or (text_kind == "sd1" and layer != "last"):
        allowed = "'last'" if text_kind == "sd1" else "'last' or 'penultimate'"
        raise CheckpointError(f"{source}: cond_stage_config layer {layer!r}; supported: {allowed}")
    depth_model = None
    if conditioning == "depth":
        depth_stage = _get(params, "depth_stage_config", "params", where=source)
        model_type = depth_stage.get("model_type")
        if model_type not in MIDAS_TYPES:
            raise CheckpointError(
                f"{source}: depth_stage_config model_type {model_type!r}; "
                f"supported: {sorted(MIDAS_TYPES)}"
            )
        depth_model = MIDAS_TYPES[model_type]
    if unet.get("in_channels") != IN_CHANNELS[conditioning]:
        raise CheckpointError(
            f"{source}: a {target} UNet takes {IN_CHANNELS[conditioning]} input channels, "
            f"unet_config says {unet.get('in_channels')}"
        )
    try:
        parameterization = check_parameterization(params.get("parameterization", "eps"))
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    return SDConfig(
        unet=unet,
        vae=vae,
        text_kind=text_kind,
        # FrozenOpenCLIPEmbedder's default arch is SD 2.x's ViT-H-14
        text_arch=text_params.get("arch", "ViT-H-14") if text_kind == "sd2" else None,
        clip_skip=TEXT_LAYERS[layer],
        parameterization=parameterization,
        scale_factor=float(params.get("scale_factor", 1.0)),
        num_timesteps=int(params.get("timesteps", 1000)),
        linear_start=float(params.get("linear_start", 0.00085)),
        linear_end=float(params.get("linear_end", 0.012)),
        conditioning=conditioning,
        depth_model=depth_model,
        image_size=params.get("image_size"),
        source=source,
    )


def sd_yaml(config: SDConfig) -> dict[str, Any]:
    """``config`` as SD's own inference yaml (what ldm, A1111, ComfyUI and diffusers'
    ``from_single_file(original_config=...)`` read)."""
    text_params: dict[str, Any] = {"freeze": True}
    if config.text_kind == "sd2":
        inverse = {v: k for k, v in TEXT_LAYERS.items()}
        text_params |= {"arch": config.text_arch or "ViT-H-14", "layer": inverse[config.clip_skip]}
    params: dict[str, Any] = {
        "linear_start": config.linear_start,
        "linear_end": config.linear_end,
        "timesteps": config.num_timesteps,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": config.image_size,
        "channels": config.unet["out_channels"],
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn" if config.conditioning == "text" else "hybrid",
        "scale_factor": config.scale_factor,
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                **config.unet,
                "image_size": config.image_size,
                "use_spatial_transformer": True,
                "legacy": False,
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {**config.vae, "lossconfig": {"target": "torch.nn.Identity"}},
        },
        "cond_stage_config": {"target": TEXT_TARGETS[config.text_kind], "params": text_params},
    }
    if config.parameterization != "eps":
        params = {"parameterization": config.parameterization, **params}
    if config.conditioning == "depth":
        model_type = {v: k for k, v in MIDAS_TYPES.items()}[config.depth_model]
        params["depth_stage_config"] = {
            "target": "ldm.modules.midas.api.MiDaSInference",
            "params": {"model_type": model_type},
        }
    return {"model": {"target": MODEL_TARGETS[config.conditioning], "params": params}}


def write_sd_yaml(config: SDConfig, path: str | Path) -> Path:
    """Write ``sd_yaml(config)`` to ``path`` (block style, keys in SD's order)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(sd_yaml(config), sort_keys=False, default_flow_style=None))
    return path
