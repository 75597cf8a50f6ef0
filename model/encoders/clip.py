"""Frozen open_clip image and text embedders, loaded from local weight files only.

Gen-1's content is a CLIP image embedding (of a clip's frame, or of a reference image); the
text path serves prompts (through a prior) and CLIP-score metrics. Models are named as
open_clip names them (``ViT-L-14-quickgelu`` for OpenAI's weights, used by SD 1.x;
``ViT-H-14`` for OpenCLIP's, used by SD 2.x) or given as a config dict such as
``TINY_CLIP_CONFIG``. Nothing is downloaded: weights come from a file, and the tokenizer is
open_clip's ``SimpleTokenizer``, whose BPE vocabulary ships inside the package.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from torch import nn

# A small CLIP for tests and the procedural world. The vocabulary stays open_clip's 49408
# BPE tokens so the built-in tokenizer applies; everything else is shrunk.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_CONFIGS: dict[str, dict[str, Any]] = {"clip_tiny": TINY_CLIP_CONFIG}

# What the weights file of a model is, for the error when it is missing.
CLIP_WEIGHTS: dict[str, str] = {
    "ViT-L-14-quickgelu": "OpenAI CLIP ViT-L/14, as SD 1.x and Stable unCLIP use it",
    "ViT-L-14": "an OpenCLIP ViT-L/14 trained with GELU (OpenAI's weights need -quickgelu)",
    "ViT-H-14": "OpenCLIP ViT-H/14 laion2b_s32b_b79k, as SD 2.x uses it",
    "clip_tiny": "the tiny CLIP this project trains on its procedural world",
}


def clip_config(model: str | dict[str, Any]) -> dict[str, Any]:
    """The open_clip model config (a copy) of a project name, an open_clip name or a dict."""
    if isinstance(model, dict):
        return copy.deepcopy(model)
    if model in CLIP_CONFIGS:
        return copy.deepcopy(CLIP_CONFIGS[model])
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        known = sorted(CLIP_CONFIGS) + open_clip.list_models()
        raise KeyError(f"unknown CLIP model {model!r}; known: {known}")
    return cfg


def _create(model: str | dict[str, Any], path: Path | None) -> ClipEmbedder:
    cfg = clip_config(model)
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise ValueError(
            f"CLIP model {model if isinstance(model, str) else 'config'}: Hugging Face text "
            "towers and tokenizers are not supported (they download at creation)"
        )
    if isinstance(model, str) and model not in CLIP_CONFIGS:
        # An absolute path can never be taken for one of open_clip's download tags.
        pretrained = str(path.resolve()) if path is not None else None
        net = open_clip.create_model(model, pretrained=pretrained)
    else:
        net_cfg = copy.deepcopy(cfg)
        custom_text = net_cfg.pop("custom_text", False)
        net = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**net_cfg)
        if path is not None:
            open_clip.load_checkpoint(net, str(path), strict=True)
    return ClipEmbedder(net, cfg)


def build_clip(model: str | dict[str, Any]) -> ClipEmbedder:
    """An embedder with random weights (for tests and for training the tiny CLIP)."""
    return _create(model, None)


def load_clip(
    path: str | Path,
    model: str | dict[str, Any] = "ViT-L-14-quickgelu",
    *,
    config_key: str = "content.clip_weights",
) -> ClipEmbedder:
    """An embedder with the weights of a local file (.safetensors, .pt or .bin).

    ``model`` is an open_clip model name (``open_clip.create_model(name, pretrained=path)``)
    or a project name / config dict (``open_clip.CLIP(**cfg)``, then the file, strictly).
    ``config_key`` names the config entry the path came from, for the missing-file error.
    """
    path = Path(path)
    if not path.is_file():
        label = model if isinstance(model, str) else "CLIP"
        what = CLIP_WEIGHTS.get(label, "open_clip weights for this model")
        raise FileNotFoundError(
            f"{config_key}: expected open_clip weights for {label!r} at {path} ({what})"
        )
    return _create(model, path)


class ClipEmbedder(nn.Module):
    """A frozen open_clip model with batched tensor preprocessing.

    ``encode_image``: images ``(..., 3, H, W)`` in [-1, 1] -> projected embeddings
    ``(..., D)``; ``encode_text``: prompts -> ``(B, D)``. Both run in inference mode and
    return normal tensors, usable as conditioning inside a training graph.
    """

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = config
        text_cfg = config.get("text_cfg", {})
        self.tokenizer = open_clip.SimpleTokenizer(
            context_length=text_cfg.get("context_length", 77),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
        pp = dataclasses.asdict(PreprocessCfg())
        pp.update(open_clip.get_model_preprocess_cfg(model))
        pp["size"] = model.visual.image_size
        if pp["resize_mode"] not in ("shortest", "squash"):
            raise ValueError(f"CLIP resize_mode {pp['resize_mode']!r} is not supported")
        self.size = (
            tuple(pp["size"]) if isinstance(pp["size"], (tuple, list)) else (pp["size"],) * 2
        )
        self.resize_mode, self.interpolation = pp["resize_mode"], pp["interpolation"]
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"CLIP interpolation {self.interpolation!r} is not supported")
        self.register_buffer("mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ClipEmbedder:
        """Stays in eval mode: the CLIP model is frozen."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Size D of the projected embedding."""
        return int(self.config["embed_dim"])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> the CLIP input, as open_clip's eval transform makes it.

        Shortest side resized to the model's size (antialiased), centre crop (or a squash
        resize), pixels clamped to [0, 1] as an 8-bit image would be, then normalised.
        """
        x = (images.float() + 1) / 2
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            size = self.size
        else:  # torchvision Resize(int): short side exact, long side floored
            short = self.size[0]
            size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if tuple(size) != (h, w):
            x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True)
        top = int(round((x.shape[-2] - self.size[0]) / 2.0))
        left = int(round((x.shape[-1] - self.size[1]) / 2.0))
        x = x[..., top : top + self.size[0], left : left + self.size[1]].clamp(0, 1)
        return (x - self.mean) / self.std

    def tokenize(self, prompts: list[str] | str) -> torch.Tensor:
        """Token ids ``(B, context_length)`` from open_clip's built-in BPE tokenizer."""
        return self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Projected image embeddings ``(..., D)`` of images ``(..., 3, H, W)`` in [-1, 1]."""
        if images.ndim < 4 or images.shape[-3] != 3:
            raise ValueError(f"expected images (..., 3, H, W), got {tuple(images.shape)}")
        lead = images.shape[:-3]
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            x = self.preprocess(images.reshape(-1, *images.shape[-3:])).to(dtype)
            emb = self.model.encode_image(x, normalize=normalize).float()
        return emb.reshape(*lead, -1).clone()

    def encode_text(self, prompts: list[str] | str, normalize: bool = False) -> torch.Tensor:
        """Projected text embeddings ``(B, D)`` of prompts."""
        tokens = self.tokenize(prompts).to(self.mean.device)
        with torch.inference_mode():
            emb = self.model.encode_text(tokens, normalize=normalize).float()
        return emb.clone()
