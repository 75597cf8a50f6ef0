"""MiDaS depth networks (DPT-Large, DPT-Hybrid, v2.1-small, tiny) on timm backbones.

The networks hold the official module layout, so the official files (``dpt_large_384.pt``,
``dpt_hybrid_384.pt``, ``midas_v21_small_256.pt``) and the MiDaS weights inside the SD 2
depth checkpoint (``depth_model.model.*``) load by their own keys. Intermediate features are
taken by walking the backbone's blocks, never through hooks. On a preprocessed batch a
network returns what the official one returns: relative inverse depth ``(N, H, W)``.
``DepthEstimator`` wraps one for video: preprocessing, frame chunks, inference mode.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.encoders.midas_blocks import (
    DPTEncoder,
    EfficientNetEncoder,
    decode,
    make_head,
    make_scratch,
)

DPT_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SD_DEPTH_PREFIX = "depth_model.model."


@dataclass(frozen=True)
class MidasConfig:
    """One MiDaS architecture, its input convention and its official file."""

    arch: str  # "dpt" (ViT encoder) or "small" (EfficientNet-Lite encoder)
    backbone: str  # timm model name, or "efficientnet_lite" (any width, see midas_blocks)
    features: int  # decoder width
    net_size: int  # the side the official transform aims at
    resize_method: str  # official Resize mode: "minimal" (DPT) or "upper_bound" (small)
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    file: str = ""  # official file name, for error messages
    description: str = ""
    hooks: tuple[int, ...] = ()  # DPT: ViT blocks whose tokens feed the decoder
    # DPT: reassembled widths per level; DPT-Hybrid's first two are its ResNet stages' widths.
    reassemble_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)  # DPT only
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


MIDAS_CONFIGS: dict[str, MidasConfig] = {
    "dpt_large_384": MidasConfig(
        arch="dpt",
        backbone="vit_large_patch16_384",
        features=256,
        net_size=384,
        resize_method="minimal",
        mean_std=DPT_MEAN_STD,
        file="dpt_large_384.pt",
        description="the official MiDaS v3 DPT-Large checkpoint",
        hooks=(5, 11, 17, 23),
        reassemble_channels=(256, 512, 1024, 1024),
    ),
    "dpt_hybrid_384": MidasConfig(
        arch="dpt",
        backbone="vit_base_r50_s16_384",
        features=256,
        net_size=384,
        resize_method="minimal",
        mean_std=DPT_MEAN_STD,
        file="dpt_hybrid_384.pt",
        description="the official MiDaS v3 DPT-Hybrid checkpoint, or an SD 2 depth checkpoint",
        hooks=(8, 11),  # the first two levels come from ResNet stages 0 and 1
        reassemble_channels=(256, 512, 768, 768),
    ),
    "midas_v21_small_256": MidasConfig(
        arch="small",
        backbone="tf_efficientnet_lite3",
        features=64,
        net_size=256,
        resize_method="upper_bound",
        mean_std=IMAGENET_MEAN_STD,
        file="midas_v21_small_256.pt",
        description="the official MiDaS v2.1 small checkpoint",
    ),
    "midas_tiny": MidasConfig(
        arch="small",
        backbone="efficientnet_lite",
        features=16,
        net_size=64,
        resize_method="upper_bound",
        mean_std=IMAGENET_MEAN_STD,
        file="midas_tiny.pt",
        description="a tiny MiDaS-small network trained by this project on its procedural world",
        backbone_kwargs={"channel_multiplier": 0.25, "depth_multiplier": 0.5, "stem_size": 16},
    ),
}


class MidasNet(nn.Module):
    """A MiDaS depth network: ``pretrained`` (encoder) and ``scratch`` (decoder and head).

    ``forward`` takes a preprocessed batch ``(N, 3, H, W)`` with sides a multiple of 32 and
    returns relative inverse depth ``(N, H, W)``, non-negative, larger = nearer.
    """

    def __init__(self, name: str, cfg: MidasConfig) -> None:
        super().__init__()
        self.name, self.config = name, cfg
        if cfg.arch == "dpt":
            self.pretrained = DPTEncoder(
                cfg.backbone, cfg.hooks, cfg.reassemble_channels, **cfg.backbone_kwargs
            )
        elif cfg.arch == "small":
            self.pretrained = EfficientNetEncoder(cfg.backbone, **cfg.backbone_kwargs)
        else:
            raise ValueError(f"MiDaS config {name!r}: arch must be 'dpt' or 'small'")
        expand = cfg.arch == "small"  # the small decoder doubles its width at every level
        channels = self.pretrained.level_channels
        self.scratch = make_scratch(channels, cfg.features, expand, align_corners=True)
        # The official DPT head upsamples with align_corners=True, the small one without.
        self.scratch.output_conv = make_head(cfg.features, align_corners=not expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(
                f"{self.name}: expected (N, 3, H, W), H, W multiples of 32, got {x.shape}"
            )
        return decode(self.scratch, self.pretrained(x)).squeeze(1)


def build_midas(name: str, **overrides: Any) -> MidasNet:
    """A MiDaS network by official name (or ``midas_tiny``), random weights, eval mode.

    ``overrides`` replace fields of its ``MidasConfig`` (e.g. ``features=32``). Build under
    ``torch.device("meta")`` to get the layout without allocating.
    """
    if name not in MIDAS_CONFIGS:
        raise KeyError(f"unknown MiDaS model {name!r}; known: {sorted(MIDAS_CONFIGS)}")
    cfg = dataclasses.replace(MIDAS_CONFIGS[name], **overrides)
    return MidasNet(name, cfg).eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.ckpt/.safetensors file; for a full SD 2 depth file, only MiDaS's."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if any(k.startswith(SD_DEPTH_PREFIX) for k in keys):
                keys = [k for k in keys if k.startswith(SD_DEPTH_PREFIX)]
            sd = {k: f.get_tensor(k) for k in keys}
    else:
        try:  # memory-mapped: a full SD checkpoint is not read just for its MiDaS part
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files from before torch's zip format cannot be mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):  # Lightning / MiDaS training checkpoints
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    if any(k.startswith(SD_DEPTH_PREFIX) for k in sd):
        sd = {k[len(SD_DEPTH_PREFIX) :]: v for k, v in sd.items() if k.startswith(SD_DEPTH_PREFIX)}
    return sd


def _layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_midas_name(state_dict: dict[str, torch.Tensor]) -> str:
    """The name of the MiDaS config whose exact key/shape layout the state dict has."""
    layout = {k: tuple(v.shape) for k, v in state_dict.items()}
    arch = "dpt" if "pretrained.model.cls_token" in layout else "small"
    for name in (n for n, cfg in MIDAS_CONFIGS.items() if cfg.arch == arch):
        with torch.device("meta"):
            if _layout(build_midas(name)) == layout:
                return name
    raise ValueError(
        f"state dict ({len(layout)} tensors) matches no MiDaS layout of {sorted(MIDAS_CONFIGS)}"
    )


def load_midas(
    path: str | Path, name: str | None = None, *, config_key: str = "depth.weights"
) -> MidasNet:
    """A MiDaS network with a file's weights (official file, SD 2 depth checkpoint or ours).

    ``name`` picks the architecture (inferred from the keys when None). ``config_key`` names
    the config entry the path came from, for the error when the file is missing. The model
    is built on the meta device and takes the file's tensors (strict): no random init.
    """
    path = Path(path)
    if not path.is_file():
        if name in MIDAS_CONFIGS:
            cfg = MIDAS_CONFIGS[name]
            what = f"MiDaS weights {cfg.file!r} at {path} ({cfg.description})"
        else:
            files = ", ".join(c.file for c in MIDAS_CONFIGS.values())
            what = f"MiDaS weights at {path} (one of {files}, or an SD 2 depth checkpoint)"
        raise FileNotFoundError(f"{config_key}: expected {what}")
    state_dict = _read_state_dict(path)
    name = name or infer_midas_name(state_dict)
    with torch.device("meta"):
        model = build_midas(name)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path}: not a {name} MiDaS checkpoint: {err}") from err
    unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        raise RuntimeError(f"{path}: {name} tensors not set by the file: {unset[:5]}")
    return model.eval().requires_grad_(False)


def midas_input_size(height: int, width: int, cfg: MidasConfig) -> tuple[int, int]:
    """The network input size the official MiDaS transform picks: aspect kept, sides x32."""
    scale_h, scale_w = cfg.net_size / height, cfg.net_size / width
    if cfg.resize_method == "minimal":  # scale as little as possible
        scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    elif cfg.resize_method == "upper_bound":  # fit inside net_size x net_size
        scale = min(scale_h, scale_w)
    else:
        raise ValueError(f"unknown MiDaS resize method {cfg.resize_method!r}")

    def multiple_of_32(x: float) -> int:
        y = round(x / 32) * 32
        if cfg.resize_method == "upper_bound" and y > cfg.net_size:
            y = math.floor(x / 32) * 32
        return max(y, 32)

    return multiple_of_32(scale * height), multiple_of_32(scale * width)


class DepthEstimator(nn.Module):
    """Frozen MiDaS over video frames: ``(B, F, 3, H, W)`` in [-1, 1] -> ``(B, F, 1, H, W)``.

    Frames go through the network ``chunk_size`` at a time, preprocessed as the official
    transform does (bicubic resize, aspect kept, sides x32, the model's normalisation), and
    the output is resized back to the frame size (bicubic, as the official ``run.py``).
    The work runs in inference mode; the result is a normal tensor usable in training graphs.
    """

    def __init__(self, net: MidasNet, chunk_size: int = 8) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"depth chunk_size must be >= 1, got {chunk_size}")
        self.net = net.eval().requires_grad_(False)
        self.chunk_size = chunk_size
        mean, std = net.config.mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DepthEstimator:
        """Stays in eval mode: the depth network is frozen."""
        return super().train(False)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> the official network input for these frames."""
        size = midas_input_size(frames.shape[-2], frames.shape[-1], self.net.config)
        x = (frames.float() + 1) / 2
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"expected frames (B, F, 3, H, W), got {tuple(frames.shape)}")
        b, f, _, h, w = frames.shape
        dtype = next(self.net.parameters()).dtype
        with torch.inference_mode():
            flat = frames.reshape(b * f, 3, h, w)
            chunks = []
            for chunk in flat.split(self.chunk_size):
                depth = self.net(self.preprocess(chunk).to(dtype)).float()
                depth = F.interpolate(depth[:, None], size=(h, w), mode="bicubic")
                chunks.append(depth)
            depth = torch.cat(chunks).reshape(b, f, 1, h, w)
        return depth.clone()
