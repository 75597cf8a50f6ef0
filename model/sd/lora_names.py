"""Where the modules a LoRA file names live in our models.

LoRA files name the layers they change in the layout of the code that trained them:

- kohya / A1111 (``lora_unet_*``, ``lora_te_*``): diffusers' module paths with ``.`` -> ``_``
  (``lora_unet_down_blocks_0_attentions_0_proj_in``,
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``); A1111 also accepts SD's own
  (LDM) names (``lora_unet_input_blocks_1_1_proj_in``), and so do we.
- diffusers / PEFT (``unet.down_blocks.0.attentions.0.proj_in``,
  ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``): the same paths, dotted.

Our UNet keeps LDM's names (``model.sd.diffusers_names`` maps them); our SD 1.x text encoder
is ``transformers.CLIPTextModel``'s layout less ``text_model.``; SD 2.x's is open_clip's, where
q, k and v are one fused ``attn.in_proj_weight`` (3 D, D): a LoRA of the HF-style ``q_proj``
changes rows ``0:D``, ``k_proj`` ``D:2D``, ``v_proj`` ``2D:3D`` (kohya trains SD 2.x through
``transformers``' CLIP, so its files name q/k/v, ``out_proj``, ``fc1``, ``fc2``).
Temporal layers (Gen-1) have no SD name: no LoRA file reaches them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model.encoders.text import TextEncoder
from model.sd.diffusers_names import unet_names


@dataclass(frozen=True)
class Target:
    """One weight a LoRA pair changes: ``module.<param>[rows]`` (``rows`` None: all of it).
    ``name`` is its path in our model, for messages and the sidecar."""

    module: nn.Module
    param: str
    name: str
    rows: slice | None = None


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def unet_targets(unet: nn.Module) -> dict[str, Target]:
    """Every name a LoRA file may give a Linear or Conv2d of an SD UNet (``UNet``), mapped to
    it: diffusers' dotted path, kohya's underscored diffusers path, A1111's underscored LDM path
    (and the LDM dotted path). Temporal layers are not in it."""
    table: dict[str, Target] = {}
    for ldm, diffusers in unet_names(unet).items():
        module = unet.get_submodule(ldm)
        if not _adaptable(module):
            continue
        target = Target(module, "weight", ldm)
        for name in (diffusers, diffusers.replace(".", "_"), ldm, ldm.replace(".", "_")):
            table[name] = target
    return table


# HF CLIPEncoderLayer's names -> (open_clip's module, its parameter, which third of in_proj).
_OPEN_CLIP = {
    "self_attn.q_proj": ("attn", "in_proj_weight", 0),
    "self_attn.k_proj": ("attn", "in_proj_weight", 1),
    "self_attn.v_proj": ("attn", "in_proj_weight", 2),
    "self_attn.out_proj": ("attn.out_proj", "weight", None),
    "mlp.fc1": ("mlp.c_fc", "weight", None),
    "mlp.fc2": ("mlp.c_proj", "weight", None),
}


def text_targets(encoder: TextEncoder) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of our SD text encoder, in ``transformers``'
    ``CLIPTextModel`` layout (with and without ``text_model.``; dotted and underscored):
    ``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``...mlp.fc{1,2}``. For an
    SD 2.x (open_clip) encoder q / k / v are row slices of ``attn.in_proj_weight``."""
    table: dict[str, Target] = {}
    for i, block in enumerate(encoder.blocks()):
        for hf, (ours, param, third) in _OPEN_CLIP.items():
            if encoder.kind == "sd1":
                ours_name = f"encoder.layers.{i}.{hf}"
                target = Target(block.get_submodule(hf), "weight", ours_name)
            else:
                ours_name = f"transformer.resblocks.{i}.{ours}.{param}"
                width = encoder.config.width
                rows = None if third is None else slice(third * width, (third + 1) * width)
                name = ours_name if rows is None else f"{ours_name}[{rows.start}:{rows.stop}]"
                target = Target(block.get_submodule(ours), param, name, rows)
            dotted = f"encoder.layers.{i}.{hf}"
            for full in (dotted, f"text_model.{dotted}"):
                table[full] = target
                table[full.replace(".", "_")] = target
    return table
