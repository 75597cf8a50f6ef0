"""Building blocks of MiDaS (DPT and v2.1-small): timm encoders and the decoder.

Encoder features are taken by walking the backbone's stages and blocks explicitly, not with
forward hooks.
Module names and ``nn.Sequential`` slot numbers follow the official MiDaS checkpoints
(``scratch.refinenet1.resConfUnit2.conv1.weight``, ``pretrained.act_postprocess1.3.weight``,
``scratch.output_conv.4.bias``), so their files load by key with no conversion step.
Parameter-free slots of the official layout (transpose, unflatten, activations) are kept as
``nn.Identity`` placeholders where a parameterised slot follows them, so the numbering holds.
"""

from __future__ import annotations

import math
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.models import EfficientNet
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from torch import nn

# EfficientNet-Lite stages as timm arch strings (the lite family: no SE, ReLU6, fixed stem).
EFFICIENTNET_LITE_ARCH = [
    ["ds_r1_k3_s1_e1_c16"],
    ["ir_r2_k3_s2_e6_c24"],
    ["ir_r2_k5_s2_e6_c40"],
    ["ir_r3_k3_s2_e6_c80"],
    ["ir_r3_k5_s1_e6_c112"],
    ["ir_r4_k5_s2_e6_c192"],
    ["ir_r1_k3_s1_e6_c320"],
]


class ResidualConvUnit(nn.Module):
    """ReLU-conv-ReLU-conv with a skip: the refinement unit of the MiDaS fusion blocks."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return out + x


class FeatureFusionBlock(nn.Module):
    """Adds a refined skip feature to the coarser path, refines, upsamples x2, projects.

    ``out_features`` is ``features`` for DPT and ``features // 2`` for the "expand" decoder of
    the small model, whose width halves at every level.
    """

    def __init__(self, features: int, out_features: int, align_corners: bool = True) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.out_conv = nn.Conv2d(features, out_features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        path = self.resConfUnit2(path)
        path = F.interpolate(
            path, scale_factor=2, mode="bilinear", align_corners=self.align_corners
        )
        return self.out_conv(path)


class ProjectReadout(nn.Module):
    """DPT's "project" readout: each patch token concatenated with the class token, projected."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        readout = tokens[:, :1].expand_as(patches)
        return self.project(torch.cat((patches, readout), dim=-1))


class Reassemble(nn.Sequential):
    """Tokens of one ViT block -> a feature map at the stride the decoder expects.

    Slots: 0 readout, 1-2 the official transpose/unflatten (done in ``forward``, since the
    grid size depends on the input), 3 a 1x1 projection, 4 an optional resampling layer
    (transposed conv up by 4 or 2, or a stride-2 conv down).
    """

    def __init__(self, dim: int, out_channels: int, resample: nn.Module | None) -> None:
        layers = [ProjectReadout(dim), nn.Identity(), nn.Identity()]
        layers.append(nn.Conv2d(dim, out_channels, kernel_size=1))
        if resample is not None:
            layers.append(resample)
        super().__init__(*layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self[0](tokens).transpose(1, 2).unflatten(2, grid)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


def make_reassemble(dim: int, out_channels: int, stride: int) -> Reassemble:
    """The reassemble step bringing ViT tokens (stride 16) to ``stride`` (4, 8, 16 or 32)."""
    if stride == 4:
        resample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=4, stride=4)
    elif stride == 8:
        resample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=2, stride=2)
    elif stride == 16:
        resample = None
    elif stride == 32:
        resample = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
    else:
        raise ValueError(f"reassemble stride must be 4, 8, 16 or 32, got {stride}")
    return Reassemble(dim, out_channels, resample)


def _resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resamples the square patch-position grid to ``grid`` (class token kept)."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[0, 1:]
    side = math.isqrt(patch_pos.shape[0])
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bilinear", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat((cls_pos, patch_pos), dim=1)


class DPTEncoder(nn.Module):
    """A timm ViT (``model``) and the reassemble steps turning its tokens into four maps.

    Levels have strides 4, 8, 16, 32. A hybrid ViT (DPT-Hybrid) gives its two fine levels
    straight from the first two ResNet stages of its patch embedding, and reassembles only
    levels 3-4 from ``hooks``; a plain ViT (DPT-Large) reassembles all four.
    """

    def __init__(
        self,
        backbone: str,
        hooks: tuple[int, ...],
        reassemble_channels: tuple[int, int, int, int],
        **backbone_kwargs: object,
    ) -> None:
        super().__init__()
        self.model = timm.create_model(backbone, pretrained=False, **backbone_kwargs)
        self.hybrid = hasattr(self.model.patch_embed, "backbone")
        self.hooks = tuple(hooks)
        levels = (3, 4) if self.hybrid else (1, 2, 3, 4)
        if len(self.hooks) != len(levels):
            raise ValueError(f"{backbone}: expected {len(levels)} hook blocks, got {self.hooks}")
        for level in levels:
            width, stride = reassemble_channels[level - 1], 2 ** (level + 1)
            reassemble = make_reassemble(self.model.embed_dim, width, stride)
            self.add_module(f"act_postprocess{level}", reassemble)
        channels = list(reassemble_channels)
        if self.hybrid:
            info = {f["module"]: f["num_chs"] for f in self.model.patch_embed.backbone.feature_info}
            channels[:2] = info["stages.0"], info["stages.1"]
        self.level_channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vit = self.model
        features = []
        if self.hybrid:
            resnet = vit.patch_embed.backbone
            x = resnet.stem(x)
            for i, stage in enumerate(resnet.stages):
                x = stage(x)
                if i < 2:
                    features.append(x)
            x = resnet.norm(x)
        x = vit.patch_embed.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        tokens = x.flatten(2).transpose(1, 2)
        tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        tokens = vit.pos_drop(tokens + _resize_pos_embed(vit.pos_embed, grid))
        for i, block in enumerate(vit.blocks[: self.hooks[-1] + 1]):
            tokens = block(tokens)
            if i in self.hooks:
                reassemble = getattr(self, f"act_postprocess{len(features) + 1}")
                features.append(reassemble(tokens, grid))
        return tuple(features)


def efficientnet_lite(
    channel_multiplier: float = 1.0, depth_multiplier: float = 1.0, stem_size: int = 32
) -> EfficientNet:
    """An EfficientNet-Lite of any width/depth (timm only names lite0-4), TF "same" padding."""
    return EfficientNet(
        block_args=decode_arch_def(EFFICIENTNET_LITE_ARCH, depth_multiplier, fix_first_last=True),
        stem_size=stem_size,
        fix_stem=True,
        round_chs_fn=partial(round_channels, multiplier=channel_multiplier),
        act_layer=nn.ReLU6,
        norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
        pad_type="same",
        num_classes=0,
    )


class EfficientNetEncoder(nn.Module):
    """EfficientNet-Lite cut into MiDaS's four levels (strides 4, 8, 16, 32), official names.

    ``backbone`` is a timm name (``tf_efficientnet_lite3``) or ``efficientnet_lite`` with
    ``efficientnet_lite`` keyword arguments. Only the stem and blocks are kept.
    """

    def __init__(self, backbone: str, **backbone_kwargs: object) -> None:
        super().__init__()
        if backbone == "efficientnet_lite":
            net = efficientnet_lite(**backbone_kwargs)
        else:
            net = timm.create_model(backbone, pretrained=False, **backbone_kwargs)
        # Slot 2 is the official stem activation; timm's bn1 applies it itself.
        self.layer1 = nn.Sequential(net.conv_stem, net.bn1, nn.Identity(), *net.blocks[0:2])
        self.layer2 = nn.Sequential(*net.blocks[2:3])
        self.layer3 = nn.Sequential(*net.blocks[3:5])
        self.layer4 = nn.Sequential(*net.blocks[5:])
        chs = {info["module"]: info["num_chs"] for info in net.feature_info}
        self.level_channels = (chs["blocks.1"], chs["blocks.2"], chs["blocks.4"], chs["blocks.6"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return tuple(features)


def make_scratch(
    in_channels: tuple[int, int, int, int], features: int, expand: bool, align_corners: bool
) -> nn.Module:
    """The decoder ("scratch"): per-level 3x3 projections and four fusion blocks.

    With ``expand`` (the small model) level ``i`` is ``features * 2**i`` wide and each fusion
    block halves the width; otherwise every level is ``features`` wide.
    """
    widths = [features * 2**i if expand else features for i in range(4)]
    scratch = nn.Module()
    for i, (cin, width) in enumerate(zip(in_channels, widths, strict=True), start=1):
        conv = nn.Conv2d(cin, width, kernel_size=3, padding=1, bias=False)
        scratch.add_module(f"layer{i}_rn", conv)
    # Registration order refinenet4..1 only affects state-dict order, not the key names.
    for i in (4, 3, 2, 1):
        width = widths[i - 1]
        out = width // 2 if expand and i > 1 else width
        block = FeatureFusionBlock(width, out, align_corners=align_corners)
        scratch.add_module(f"refinenet{i}", block)
    return scratch


def make_head(features: int, align_corners: bool) -> nn.Sequential:
    """Output head: conv, upsample x2, conv, ReLU, 1x1 conv to one channel, ReLU (non-negative).

    The result is relative inverse depth, as the official models return it.
    """
    return nn.Sequential(
        nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners),
        nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 1, kernel_size=1),
        nn.ReLU(),
    )


def decode(scratch: nn.Module, layers: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Runs the shared MiDaS decoder on four encoder features (strides 4, 8, 16, 32)."""
    rn = [getattr(scratch, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1)]
    path = scratch.refinenet4(rn[3])
    path = scratch.refinenet3(path, rn[2])
    path = scratch.refinenet2(path, rn[1])
    path = scratch.refinenet1(path, rn[0])
    return scratch.output_conv(path)
