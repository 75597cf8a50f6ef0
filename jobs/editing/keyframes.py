"""infer.py's ``keyframes``: read and checked before any compute, their content encoded once,
and the per-frame schedule (``model.editing.keyframes``) for any frames of the edit."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from data.media import MediaError, read_image
from jobs.editing.request import InferError
from model.editing.content import image_content, text_content
from model.editing.keyframes import (
    SCALARS,
    Keyframe,
    content_schedule,
    lora_key,
    lora_keys,
    parse_keyframes,
    scalar_schedule,
)
from model.editing.precision import autocast


def keyframe_entries(cfg: DictConfig) -> list[dict]:
    """``cfg.keyframes`` as plain entries: a list in the config, or a YAML / JSON file of
    one (a list, or a mapping with a ``keyframes`` list); ``InferError`` if unreadable."""
    value = cfg.get("keyframes")
    if value is None or value == []:
        return []
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise InferError(f"keyframes file not found: {path}")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise InferError(f"{path}: not a readable keyframes file ({err})") from err
        data = data.get("keyframes") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise InferError(f"{path}: a keyframes file holds a list of keyframes")
        return data
    return OmegaConf.to_container(value, resolve=True)


def requested_keyframes(cfg: DictConfig, kind: str, num_frames: int | None = None):
    """The keyframes, checked in one line: their keys and frames, content an SD file can
    take (prompts), reference files that exist."""
    try:
        keys = parse_keyframes(keyframe_entries(cfg), num_frames)
    except ValueError as err:
        raise InferError(str(err)) from err
    files = len(cfg.get("lora") or [])
    for key in keys:
        weights = lora_keys(key.values)
        if weights and len(weights) != files:
            raise InferError(
                f"keyframe {key.frame}: lora gives {len(weights)} weight(s); give one per file "
                f"of lora= ({files})"
            )
        if key.reference is not None and kind == "sd":
            raise InferError(
                f"keyframe {key.frame}: an SD checkpoint is conditioned on text: give a "
                "prompt, not a reference"
            )
        if key.reference is not None and not Path(key.reference).is_file():
            raise InferError(f"keyframe {key.frame}: reference not found: {key.reference}")
        if key.prompt is not None and kind != "sd" and cfg.prompt_mode == "prior":
            if not cfg.prior or not Path(str(cfg.prior)).is_file():
                raise InferError(f"keyframe {key.frame}: a prompt needs prior=FILE")
    return keys


@dataclass
class KeyframeSchedule:
    """The edit's keyframes with their content encoded: ``content_of`` / ``schedule_of`` give
    any frames' content and settings (``edit_video``'s ``content`` and ``schedule``)."""

    keys: list[Keyframe]
    content_frames: list[int]  # keyframes that set content (the edit's content at 0 if none)
    embeddings: torch.Tensor  # (K, ...) their content (Gen-1 (1, D); SD (tokens, D))
    base: object  # the edit's own content
    defaults: dict[str, float]

    def content_of(self, positions: list[int]):
        """Content for the frames ``positions``: Gen-1 ``(1, n, 1, D)``; SD a
        ``PromptEmbedding`` whose ``cond`` is ``(1, n, tokens, D)``."""
        per_frame = content_schedule(self.content_frames, self.embeddings, positions)[None]
        if hasattr(self.base, "uncond"):  # an SD PromptEmbedding
            return replace(self.base, cond=per_frame.to(self.base.cond))
        return per_frame.to(self.base)

    def schedule_of(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """Per-frame ``(n,)`` values of the settings any keyframe gives."""
        given = {k for key in self.keys for k in key.values}
        return {k: scalar_schedule(self.keys, k, self.defaults[k], positions) for k in given}

    def describe(self, num_frames: int) -> dict:
        """The keyframes and the per-frame schedule, for the sidecar."""
        positions = list(range(num_frames))
        return {
            "keyframes": [
                {"frame": k.frame, "prompt": k.prompt, "reference": k.reference, **k.values}
                for k in self.keys
            ],
            "content_keyframes": self.content_frames,
            "schedule": {
                k: [round(x, 5) for x in v.tolist()] for k, v in self.schedule_of(positions).items()
            },
        }


def keyframe_schedule(
    cfg, keys, model, kind, base, device, dtype, prompt_content, lora_weights=()
) -> KeyframeSchedule:
    """Encode every keyframe's content (``prompt_content(text)``: the edit's own text route,
    the prior or SD's encoder; references through CLIP); keyframes without content take
    the edit's own content ``base`` (at frame 0 when no keyframe sets it). ``lora_weights``:
    the edit's own weight of each ``lora`` file, where no keyframe gives one."""
    frames, embeddings = [], []
    with autocast(device, dtype):
        for key in keys:
            if key.prompt is not None:
                content = prompt_content(key.prompt)
            elif key.reference is not None:
                try:
                    image = torch.from_numpy(read_image(key.reference).copy()).permute(2, 0, 1)
                except MediaError as err:
                    raise InferError(f"keyframe {key.frame}: {err}") from err
                content = image_content(model, image[None].float() / 127.5 - 1)
            else:
                continue
            frames.append(key.frame)
            embeddings.append(_vector(content))
    if not frames or frames[0] != 0:
        frames.insert(0, 0)
        embeddings.insert(0, _vector(base))
    defaults = {k: float(cfg[k]) for k in SCALARS}
    defaults |= {lora_key(i): float(w) for i, w in enumerate(lora_weights)}
    return KeyframeSchedule(keys, frames, torch.stack(embeddings), base, defaults)


def _vector(content) -> torch.Tensor:
    """A content as the tensor interpolated: Gen-1 ``(1, D)``, SD ``(tokens, D)``."""
    if hasattr(content, "cond"):
        return content.cond[0].float().cpu()
    return content[0].float().cpu()


def prompt_route(cfg: DictConfig, model, kind: str, prior):
    """``text -> content`` as the edit's own prompt goes: SD's text encoder (with the
    negative prompt), or Gen-1's prior / CLIP text embedding."""
    if kind == "sd":
        return lambda text: model.encode_prompt(text, cfg.negative_prompt)
    return lambda text: text_content(model, text, cfg.prompt_mode, prior=prior)
