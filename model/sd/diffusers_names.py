"""The names diffusers gives the modules of an SD UNet, for files written in its layout.

Our UNet keeps SD's original (LDM) module names (``input_blocks.1.1.proj_in``); diffusers
renames the same modules by block and role (``down_blocks.0.attentions.0.proj_in``). Files
that users bring in diffusers' layout (a ControlNet's ``diffusion_pytorch_model.safetensors``,
PEFT LoRAs) and kohya LoRAs (diffusers' names with ``_`` for ``.``) name modules that way, so
loading them needs the map between the two. It is computed from the UNet's own structure
(levels, residual blocks, attention, resampling), so every config (SD 1.x, 2.x, depth,
inpainting, the tiny ones) gets its map, and the names follow diffusers'
``convert_ldm_unet_checkpoint`` (``diffusers/loaders/single_file_utils.py``).

Gen-1's temporal layers have no diffusers name and are left out of the map.
"""

from __future__ import annotations

from torch import nn

from model.nets.blocks import Downsample, ResBlock, SpatialTransformer, Upsample

# Inside a residual block: LDM's Sequential indices -> diffusers' ResnetBlock2D names.
RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Blocks outside the levels.
TOP_LEVEL_NAMES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "label_emb": "class_embedding",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _block_names(prefix: str, target: str, block: nn.Module) -> dict[str, str]:
    """LDM -> diffusers names of one residual, attention or resampling block's modules."""
    if isinstance(block, ResBlock):
        names = {
            f"{prefix}.{ours}": f"{target}.{theirs}" for ours, theirs in RESBLOCK_NAMES.items()
        }
        names[prefix] = target
        return names
    if isinstance(block, SpatialTransformer):
        names = {prefix: target}
        for name, _ in block.named_modules():
            if name and not name.startswith("temporal"):
                names[f"{prefix}.{name}"] = f"{target}.{name}"
        return names
    if isinstance(block, Downsample):
        return {prefix: target, f"{prefix}.op": f"{target}.conv"}
    if isinstance(block, Upsample):
        return {prefix: target, f"{prefix}.conv": f"{target}.conv"}
    raise TypeError(f"no diffusers name for {type(block).__name__} at {prefix}")


def encoder_names(unet: nn.Module) -> dict[str, str]:
    """LDM -> diffusers module names of the UNet's encoder half and middle block (what a
    ControlNet copies): ``input_blocks.*`` -> ``down_blocks.*``, ``middle_block.*`` ->
    ``mid_block.*``, plus the top-level modules."""
    names = {k: v for k, v in TOP_LEVEL_NAMES.items() if not k.startswith("out.")}
    if not isinstance(getattr(unet, "label_emb", None), nn.Embedding):
        del names["label_emb"]  # only a class-conditioned UNet's embedding is one module
    level, index = 0, {"resnets": 0, "attentions": 0}
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        if isinstance(block[0], Downsample):
            names |= _block_names(
                f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", block[0]
            )
            level, index = level + 1, {"resnets": 0, "attentions": 0}
            continue
        for j, part in enumerate(block):
            role = "resnets" if isinstance(part, ResBlock) else "attentions"
            target = f"down_blocks.{level}.{role}.{index[role]}"
            names |= _block_names(f"input_blocks.{i}.{j}", target, part)
            index[role] += 1
    for j, part in enumerate(unet.middle_block):
        role = "resnets" if isinstance(part, ResBlock) else "attentions"
        position = j // 2 if role == "resnets" else 0
        names |= _block_names(f"middle_block.{j}", f"mid_block.{role}.{position}", part)
    return {k: v for k, v in names.items() if _exists(unet, k)}


def unet_names(unet: nn.Module) -> dict[str, str]:
    """LDM -> diffusers names of every module of an SD UNet (``model.nets.unet.UNet``) that
    diffusers' ``UNet2DConditionModel`` has, e.g. ``input_blocks.1.1.proj_in`` ->
    ``down_blocks.0.attentions.0.proj_in`` and ``output_blocks.2.1.conv`` ->
    ``up_blocks.0.upsamplers.0.conv``. Temporal layers are not in it."""
    names = encoder_names(unet) | {k: v for k, v in TOP_LEVEL_NAMES.items() if k.startswith("out.")}
    per_level = len(unet.output_blocks) // max(1, _levels(unet))
    for i, block in enumerate(unet.output_blocks):
        level, j = divmod(i, per_level)
        for k, part in enumerate(block):
            if isinstance(part, ResBlock):
                target = f"up_blocks.{level}.resnets.{j}"
            elif isinstance(part, Upsample):
                target = f"up_blocks.{level}.upsamplers.0"
            else:
                target = f"up_blocks.{level}.attentions.{j}"
            names |= _block_names(f"output_blocks.{i}.{k}", target, part)
    return {k: v for k, v in names.items() if _exists(unet, k)}


def _levels(unet: nn.Module) -> int:
    downsamples = sum(isinstance(b[0], Downsample) for b in unet.input_blocks)
    return downsamples + 1


def _exists(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def rename_keys(state: dict, names: dict[str, str]) -> tuple[dict, list[str]]:
    """``state`` with keys in diffusers' names (``down_blocks.0.resnets.0.conv1.weight``) renamed
    to LDM's through ``names`` (LDM -> diffusers, as :func:`unet_names` gives), matching the
    longest module prefix; returns the renamed dict and the keys no name matched."""
    inverse = {theirs: ours for ours, theirs in names.items()}
    renamed, unmatched = {}, []
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in inverse:
            renamed[f"{inverse[module]}.{param}"] = value
        else:
            unmatched.append(key)
    return renamed, unmatched
