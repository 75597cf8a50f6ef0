"""LoRA files as users have them, merged into an SD (or Gen-1) model's weights and undone.

Formats (recognised from the keys):

- kohya / A1111 / ComfyUI: ``{stem}.lora_down.weight`` ``(r, in[, kh, kw])``,
  ``{stem}.lora_up.weight`` ``(out, r[, 1, 1])``, optional ``{stem}.alpha`` (a scalar), with
  ``stem`` ``lora_unet_*`` (the UNet), ``lora_te_*`` / ``lora_te1_*`` (the text encoder) or
  ``lora_te2_*`` (SDXL's second one). Linear and conv layers; LoCon's kxk ``lora_down`` with a
  1x1 ``lora_up`` too.
- diffusers / PEFT: ``unet.{path}.lora_A.weight`` / ``.lora_B.weight`` (and ``text_encoder.``,
  ``text_encoder_2.``), the older ``{path}.lora.down.weight`` / ``.lora.up.weight`` and
  attention-processor forms (``attn1.processor.to_q_lora.down.weight``); alphas from
  ``{path}.alpha`` keys or the ``lora_adapter_metadata`` diffusers writes (PEFT's
  ``lora_alpha``, ``r``, ``alpha_pattern``, ``use_rslora``).

Merging follows kohya's ``LoRAModule`` / PEFT's ``get_delta_weight``:
``W += weight * (alpha / r) * up @ down`` (alpha absent: ``alpha = r``; rsLoRA: ``alpha /
sqrt(r)``), conv deltas reshaped to the kernel. The originals of every changed tensor are kept
and put back, bit for bit, by ``MergedLoras.restore``. Every pair must find its layer: keys
that match nothing, or a delta of the wrong shape, raise ``CheckpointError`` naming the file
and the keys.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from model.encoders.text import TextEncoder
from model.sd.lora_names import Target, text_targets, unet_targets
from model.weights.checkpoint import CheckpointError, read_state_dict

KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text", "lora_te1_": "text", "lora_te2_": "text2"}
DIFFUSERS_PARTS = {"unet.": "unet", "text_encoder.": "text", "text_encoder_2.": "text2"}
# diffusers / PEFT suffixes -> role
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".down.weight": "down",  # attention processors: attn1.processor.to_q_lora.down.weight
    ".up.weight": "up",
    ".alpha": "alpha",
}
_PROCESSOR = re.compile(r"(?:\.processor)?\.(to_[qkv]|to_out)_lora$")
_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _sample(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


@dataclass
class LoraPair:
    """One low-rank update: ``up @ down`` for the layer ``module`` (named as the file names it)
    of ``part`` ("unet", "text", "text2"); ``alpha`` None means ``alpha = rank``."""

    key: str
    part: str
    module: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """``up @ down`` in float32: ``(out, in)`` or, for conv, ``(out, in, kh, kw)``."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        return product.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else product


@dataclass
class LoraFile:
    """A LoRA file's pairs, its format ("kohya" or "diffusers") and its metadata."""

    path: str
    format: str
    pairs: list[LoraPair]
    metadata: dict[str, str] = field(default_factory=dict)

    def parts(self) -> list[str]:
        """The models it changes, in order: ``unet``, ``text``, ``text2``."""
        return sorted({p.part for p in self.pairs}, key=["unet", "text", "text2"].index)


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _kohya_pairs(state: Mapping[str, torch.Tensor], path: str) -> list[LoraPair]:
    pairs: dict[str, LoraPair] = {}
    strange = []
    for key, value in state.items():
        stem, _, suffix = key.partition(".")
        prefix = next((p for p in KOHYA_PARTS if stem.startswith(p)), None)
        if prefix is None or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            strange.append(key)
            continue
        pair = pairs.setdefault(stem, LoraPair(stem, KOHYA_PARTS[prefix], stem[len(prefix) :]))
        if suffix == "alpha":
            pair.alpha = float(value)
        else:
            setattr(pair, "down" if suffix == "lora_down.weight" else "up", value)
    if strange:
        raise CheckpointError(
            f"{path}: {len(strange)} keys are not kohya LoRA pairs (lora_down / lora_up / alpha; "
            f"LoHa, LoKr, DoRA and Tucker-decomposed LoCon are not supported): {_sample(strange)}"
        )
    return list(pairs.values())


def _diffusers_module(part: str, module: str) -> str:
    """An older diffusers module path in today's names: attention-processor LoRAs
    (``attn1.processor.to_q_lora`` -> ``attn1.to_q``, ``to_out_lora`` -> ``to_out.0``; in the
    text encoder ``self_attn.to_q_lora`` -> ``self_attn.q_proj``)."""
    match = _PROCESSOR.search(module)
    if match is None:
        return module
    layer = match.group(1)
    if part == "unet":
        return module[: match.start()] + "." + ("to_out.0" if layer == "to_out" else layer)
    return module[: match.start()] + "." + _TEXT_PROCESSOR[layer]


def _diffusers_pairs(state: Mapping[str, torch.Tensor], path: str) -> list[LoraPair]:
    pairs: dict[tuple[str, str], LoraPair] = {}
    strange = []
    for key, value in state.items():
        prefix = next((p for p in DIFFUSERS_PARTS if key.startswith(p)), None)
        suffix = next((s for s in _DIFFUSERS_SUFFIXES if key.endswith(s)), None)
        if prefix is None or suffix is None:
            strange.append(key)
            continue
        part = DIFFUSERS_PARTS[prefix]
        module = _diffusers_module(part, key[len(prefix) : -len(suffix)])
        pair = pairs.setdefault((part, module), LoraPair(key, part, module))
        role = _DIFFUSERS_SUFFIXES[suffix]
        if role == "alpha":
            pair.alpha = float(value)
        else:
            setattr(pair, role, value)
    if strange:
        raise CheckpointError(
            f"{path}: {len(strange)} keys are not diffusers / PEFT LoRA tensors "
            f"(unet. / text_encoder. ... lora_A / lora_B): {_sample(strange)}"
        )
    return list(pairs.values())


def _apply_adapter_metadata(pairs: list[LoraPair], metadata: Mapping[str, str]) -> None:
    """Alphas from diffusers' ``lora_adapter_metadata`` (PEFT ``LoraConfig`` per part:
    ``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora`` ...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    config = json.loads(raw)
    names = {"unet": "unet", "text": "text_encoder", "text2": "text_encoder_2"}
    for pair in pairs:
        if pair.alpha is not None:
            continue
        get = lambda k, p=pair: config.get(f"{names[p.part]}.{k}")  # noqa: E731
        alpha = get("lora_alpha")
        for pattern, value in (get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", pair.module):
                alpha = value
        if alpha is not None:
            rank = pair.rank
            pair.alpha = alpha * (math.sqrt(rank) if get("use_rslora") else 1.0)


def read_lora(path: str | Path) -> LoraFile:
    """The pairs of a LoRA file (``.safetensors``, or ``.ckpt`` / ``.pt`` read as data).

    Raises ``FileNotFoundError``, or ``CheckpointError`` naming the file and keys for a file
    that is no LoRA, mixes formats, has keys of another kind, or a pair lacking its half.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    state = read_state_dict(path)
    if not state:
        raise CheckpointError(f"{path}: no tensors: not a LoRA file")
    kohya = any(k.startswith("lora_") for k in state)
    if kohya:
        pairs, kind = _kohya_pairs(state, str(path)), "kohya"
    elif any(k.startswith(tuple(DIFFUSERS_PARTS)) for k in state):
        pairs, kind = _diffusers_pairs(state, str(path)), "diffusers"
    else:
        raise CheckpointError(
            f"{path}: not a LoRA file (no lora_unet_* / lora_te_* or unet.* / text_encoder.* "
            f"keys): {_sample(state)}"
        )
    halves = [p.key for p in pairs if p.down is None or p.up is None]
    if halves:
        raise CheckpointError(
            f"{path}: LoRA pairs lacking their down or up half: {_sample(halves)}"
        )
    bad = [p.key for p in pairs if p.up.shape[1] != p.down.shape[0]]
    if bad:
        raise CheckpointError(f"{path}: up and down ranks differ: {_sample(bad)}")
    metadata = _metadata(path)
    _apply_adapter_metadata(pairs, metadata)
    return LoraFile(str(path), kind, pairs, metadata)


def _fit(delta: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """``delta`` in the weight's shape: a linear delta for a 1x1 conv (and back) reshaped, a
    conv_in delta of fewer input channels zero-filled (Gen-1's structure channels)."""
    if delta.shape[0] == shape[0] and delta.numel() == math.prod(shape):
        return delta.reshape(shape)
    if delta.ndim == 4 and len(shape) == 4 and delta.shape[0] == shape[0]:
        if delta.shape[1] < shape[1] and delta.shape[2:] == shape[2:]:
            extra = torch.zeros(shape[0], shape[1] - delta.shape[1], *shape[2:])
            return torch.cat([delta, extra], dim=1)
    raise CheckpointError(
        f"{key}: a delta of shape {tuple(delta.shape)} for a weight {tuple(shape)}"
    )


def scaled_delta(pair: LoraPair, shape: torch.Size) -> torch.Tensor:
    """The pair's change to a weight of ``shape`` at LoRA weight 1, in float32: ``alpha / r *
    up @ down`` fitted to the layer (``CheckpointError`` when it cannot be)."""
    alpha = pair.rank if pair.alpha is None else pair.alpha
    return _fit(pair.delta(), shape, pair.key) * (alpha / pair.rank)


class MergedLoras:
    """LoRAs merged into a model's weights; ``restore()`` (or leaving the ``with`` block) puts
    the original tensors back bit for bit. ``applied``: per file, its path, weight, format and
    the layers it changed (for a sidecar)."""

    def __init__(self) -> None:
        self.originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.applied: list[dict] = []

    def keep(self, tensor: torch.Tensor) -> None:
        """Remember ``tensor``'s values before its first change."""
        if id(tensor) not in self.originals:
            self.originals[id(tensor)] = (tensor, tensor.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        """Every changed weight back to its original values (exactly)."""
        for tensor, original in self.originals.values():
            tensor.copy_(original)
        self.originals.clear()

    def __enter__(self) -> MergedLoras:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def resolve_targets(
    lora: LoraFile, tables: dict[str, dict[str, Target] | None], skip_text: bool
) -> tuple[list[tuple[LoraPair, Target]], list[str]]:
    """Each pair of ``lora`` with the layer it changes (``tables``: per part, the names a file
    may give, from ``unet_targets`` / ``text_targets``; None where the model lacks the
    part), and the parts skipped (``skip_text``: a text-encoder part of a model without
    one). ``CheckpointError`` (file and keys named) for a missing part or keys that match
    no layer."""
    skipped = []
    for part in lora.parts():
        if tables.get(part) is None:
            if part == "text" and skip_text:
                skipped.append(part)
                continue
            what = {"text": "a text encoder", "text2": "a second text encoder (SDXL's)"}[part]
            keys = [p.key for p in lora.pairs if p.part == part]
            raise CheckpointError(
                f"{lora.path}: changes {what}, which this model does not have: {_sample(keys, 3)}"
            )
    found, unmatched = [], []
    for pair in lora.pairs:
        if pair.part in skipped:
            continue
        target = tables[pair.part].get(pair.module)
        if target is None:
            unmatched.append(pair.key)
        else:
            found.append((pair, target))
    if unmatched:
        raise CheckpointError(
            f"{lora.path}: {len(unmatched)} LoRA keys match no layer of this model: "
            f"{_sample(unmatched)}"
        )
    return found, skipped


@torch.no_grad()
def merge_loras(
    loras: Sequence[tuple[str | Path | LoraFile, float]],
    unet: nn.Module,
    text_encoder: TextEncoder | None = None,
    *,
    skip_text: bool = False,
    merged: MergedLoras | None = None,
) -> MergedLoras:
    """Merge each ``(file, weight)`` into ``unet`` (an SD or Gen-1 ``UNet``) and
    ``text_encoder``: ``W += weight * alpha / r * up @ down``, summed in float32 and rounded
    once to the weight's dtype (fp16 weights merge as fp32 ones then cast would, to one
    rounding). ``skip_text``: a model without a text encoder (Gen-1, conditioned on
    CLIP image embeddings) leaves a file's text-encoder part out (recorded as skipped) instead
    of refusing it. Every file is checked before any weight changes.

    Returns the :class:`MergedLoras` holding the originals. Raises ``CheckpointError`` (file
    and keys named) for unmatched keys, a missing encoder or a misshapen delta.
    """
    merged = merged or MergedLoras()
    tables = {
        "unet": unet_targets(unet),
        "text": text_targets(text_encoder) if text_encoder is not None else None,
        "text2": None,
    }
    files = [(read_lora(f) if not isinstance(f, LoraFile) else f, float(w)) for f, w in loras]
    plans = [(lora, weight, *resolve_targets(lora, tables, skip_text)) for lora, weight in files]
    for lora, _, found, _ in plans:  # shapes, before anything changes
        for pair, target in found:
            weight = getattr(target.module, target.param)
            shape = weight[target.rows].shape if target.rows is not None else weight.shape
            try:
                _fit(pair.delta(), shape, pair.key)
            except CheckpointError as err:
                raise CheckpointError(f"{lora.path}: {err}") from None
    for lora, weight, found, skipped in plans:
        for pair, target in found:
            param = getattr(target.module, target.param)
            merged.keep(param)
            view = param[target.rows] if target.rows is not None else param
            delta = scaled_delta(pair, view.shape) * weight
            view.copy_((view.float() + delta.to(param.device)).to(param.dtype))
        merged.applied.append(
            {
                "file": lora.path,
                "weight": weight,
                "format": lora.format,
                "layers": len(found),
                "parts": [p for p in lora.parts() if p not in skipped],
                "skipped": skipped,
            }
        )
    return merged
