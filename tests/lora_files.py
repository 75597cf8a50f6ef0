"""Test helpers: random LoRA files for a tiny SD model, in kohya's and diffusers' (PEFT) layouts,
naming every Linear / Conv2d of its UNet and text encoder the way those tools name them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.sd.diffusers_names import unet_names
from model.sd.model import StableDiffusion


def unet_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """diffusers path -> our Linear / Conv2d of every UNet layer diffusers has."""
    layers = {}
    for ldm, diffusers in unet_names(unet).items():
        module = unet.get_submodule(ldm)
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            layers[diffusers] = module
    return layers


def text_layers(model: StableDiffusion, skip_last: bool) -> dict[str, tuple[int, int]]:
    """HF CLIP path -> (out, in) of every text-encoder projection (SD 2.x's last block left out
    when ``skip_last``: diffusers runs SD 2 without it)."""
    config = model.text_encoder.config
    layers = {}
    n = config.layers - (1 if skip_last else 0)
    for i in range(n):
        w, m = config.width, config.mlp_width
        for name, shape in [("self_attn.q_proj", (w, w)), ("self_attn.k_proj", (w, w)),
                            ("self_attn.v_proj", (w, w)), ("self_attn.out_proj", (w, w)),
                            ("mlp.fc1", (m, w)), ("mlp.fc2", (w, m))]:  # fmt: skip
            layers[f"text_model.encoder.layers.{i}.{name}"] = shape
    return layers


def _pair(out: int, inp: int, rank: int, kernel: int | None, gen: torch.Generator):
    if kernel is None:
        down = torch.randn(rank, inp, generator=gen) * 0.3
        up = torch.randn(out, rank, generator=gen) * 0.3
    else:  # LoCon: a kxk down, 1x1 up
        down = torch.randn(rank, inp, kernel, kernel, generator=gen) * 0.3
        up = torch.randn(out, rank, 1, 1, generator=gen) * 0.3
    return down, up


def _shape(module: torch.nn.Module) -> tuple[int, int, int | None]:
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels, module.in_channels, module.kernel_size[0]
    return module.out_features, module.in_features, None


def write_kohya_lora(
    path: Path,
    model: StableDiffusion,
    seed: int = 0,
    text: bool = True,
    ldm_names: bool = False,
    alphas: bool = True,
) -> Path:
    """A kohya LoRA over every UNet layer (LoCon for 3x3 convs) and, with ``text``, every text
    projection, ranks 2-4; as kohya writes them, one ``network_alpha`` (2) for linear and 1x1
    layers and one ``conv_alpha`` (1) for 3x3 convs (``alphas`` False: no alpha keys)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    names = {v: k for k, v in unet_names(model.unet).items()}
    for i, (name, module) in enumerate(unet_layers(model.unet).items()):
        out, inp, kernel = _shape(module)
        stem = "lora_unet_" + (names[name] if ldm_names else name).replace(".", "_")
        rank = 2 + i % 3
        state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = _pair(
            out, inp, rank, kernel, gen
        )
        if alphas:
            state[f"{stem}.alpha"] = torch.tensor(1.0 if kernel == 3 else 2.0)
    if text:
        skip = model.text_encoder.kind == "sd2"
        for i, (name, (out, inp)) in enumerate(text_layers(model, skip).items()):
            stem = "lora_te_" + name.replace(".", "_")
            rank = 2 + i % 2
            state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = _pair(
                out, inp, rank, None, gen
            )
            if alphas:
                state[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


def write_peft_lora(path: Path, model: StableDiffusion, seed: int = 0, rank: int = 4) -> Path:
    """A diffusers / PEFT LoRA (``unet.*.lora_A.weight`` ...; ``text_encoder.*``) with its
    ``lora_adapter_metadata`` (``lora_alpha`` 8, one module's alpha by ``alpha_pattern``)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    attention = {}
    for name, module in unet_layers(model.unet).items():
        if ".attentions." not in name:  # PEFT LoRAs usually target attention layers
            continue
        out, inp, kernel = _shape(module)
        down, up = _pair(out, inp, rank, kernel if kernel == 1 else None, gen)
        state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = down, up
        attention[name] = module
    skip = model.text_encoder.kind == "sd2"
    for name, (out, inp) in text_layers(model, skip).items():
        down, up = _pair(out, inp, rank, None, gen)
        state[f"text_encoder.{name}.lora_A.weight"] = down
        state[f"text_encoder.{name}.lora_B.weight"] = up
    special = next(n for n in attention if n.endswith("attn1.to_q"))
    targets = sorted({n.rsplit(".", 1)[-1] for n in attention})
    metadata = {
        "unet.r": rank, "unet.lora_alpha": 8, "unet.target_modules": targets,
        "unet.alpha_pattern": {special: 2}, "unet.rank_pattern": {},
        "text_encoder.r": rank, "text_encoder.lora_alpha": 2,
        "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "text_encoder.alpha_pattern": {}, "text_encoder.rank_pattern": {},
    }  # fmt: skip
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path
