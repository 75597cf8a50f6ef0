"""Control over time: settings given at keyframes, interpolated to every frame.

A keyframe sets, at one frame of the edit, any of: the content (a ``prompt`` or a
``reference`` image), Gen-1's ``t_s`` and ``w_t``, the content guidance ``w``, the
SDEdit ``strength`` and the weights of the edit's LoRA files (``lora``, one per file, in
their order; scheduled as ``lora.0``, ``lora.1``, ...). Between keyframes scalars move
linearly, content embeddings along the sphere (slerp of their directions, their norms
linearly: a CLIP image embedding's norm is not its meaning); before the first keyframe and
after the last a value holds. A setting no keyframe names stays the edit's own. ``t_s``
blurs a whole number of times: it is rounded. (Deforum's and Runway's keyframe schedules
interpolate the same way.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

SCALARS = ("t_s", "w_t", "w", "strength")
CONTENT = ("prompt", "reference")
KEYS = ("frame", *CONTENT, *SCALARS, "lora")


def lora_key(index: int) -> str:
    """The schedule's name for the weight of the edit's ``index``-th LoRA file."""
    return f"lora.{index}"


def lora_keys(schedule: Mapping[str, object]) -> list[str]:
    """The LoRA weights a schedule holds, in the order of the edit's LoRA files."""
    return sorted((k for k in schedule if k.startswith("lora.")), key=lambda k: int(k[5:]))


@dataclass(frozen=True)
class Keyframe:
    """The settings given at one ``frame`` (an index of the edited frames, from 0)."""

    frame: int
    prompt: str | None = None
    reference: str | None = None  # an image file
    values: dict[str, float] = field(default_factory=dict)  # of SCALARS

    @property
    def content(self) -> str | None:
        """What sets its content, for messages and the sidecar."""
        return self.prompt if self.prompt is not None else self.reference


def parse_keyframes(entries: Sequence[Mapping], num_frames: int | None = None) -> list[Keyframe]:
    """Keyframes from plain data (``infer.py keyframes=[{frame: 0, prompt: ...}, ...]`` or
    the entries of a YAML / JSON file), sorted by frame. ``ValueError`` in one line for an
    unknown key, a missing or repeated frame, a frame outside the ``num_frames`` edited
    (None: not known yet), both a prompt and a reference, or a value out of range."""
    keyframes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"keyframes[{i}] must be a mapping like {{frame: 0, prompt: ...}}")
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise ValueError(
                f"keyframes[{i}]: unknown key {unknown[0]!r}; known: {', '.join(KEYS)}"
            )
        frame = entry.get("frame")
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
            raise ValueError(f"keyframes[{i}]: frame must be a frame number >= 0, got {frame!r}")
        if num_frames is not None and frame >= num_frames:
            raise ValueError(f"keyframes[{i}]: frame {frame} is outside the {num_frames} edited")
        if entry.get("prompt") is not None and entry.get("reference") is not None:
            raise ValueError(f"keyframes[{i}]: give a prompt or a reference, not both")
        values = {}
        for key in SCALARS:
            if entry.get(key) is None:
                continue
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"keyframes[{i}]: {key} must be a number >= 0, got {value!r}")
            if key == "strength" and value > 1:
                raise ValueError(f"keyframes[{i}]: strength must be in [0, 1], got {value}")
            values[key] = float(value)
        weights = entry.get("lora")
        if weights is not None:
            numbers = isinstance(weights, Sequence) and not isinstance(weights, str)
            if not numbers or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in weights
            ):
                raise ValueError(
                    f"keyframes[{i}]: lora must be a list of weights, one per lora file, "
                    f"got {weights!r}"
                )
            values |= {lora_key(j): float(v) for j, v in enumerate(weights)}
        prompt, reference = entry.get("prompt"), entry.get("reference")
        keyframes.append(
            Keyframe(frame, None if prompt is None else str(prompt),
                     None if reference is None else str(reference), values)
        )  # fmt: skip
    frames = [k.frame for k in keyframes]
    if len(set(frames)) != len(frames):
        raise ValueError(
            f"keyframes: frame {sorted(f for f in frames if frames.count(f) > 1)[0]} is given twice"
        )
    return sorted(keyframes, key=lambda k: k.frame)


def interpolation(
    frames: Sequence[int], indices: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each frame of ``indices``: the keyframe ``(K,)`` it follows (``left``, an index
    into ``frames``, sorted) and how far it is toward the next (``t`` in [0, 1]); before the
    first keyframe and after the last, ``t`` is 0 at the nearest one."""
    keys = torch.tensor(list(frames), dtype=torch.float64)
    at = torch.tensor(list(indices), dtype=torch.float64)
    left = (torch.searchsorted(keys, at, right=True) - 1).clamp(0, len(keys) - 1)
    right = (left + 1).clamp(max=len(keys) - 1)
    span = (keys[right] - keys[left]).clamp_min(1)
    t = ((at - keys[left]) / span).clamp(0, 1)
    t = torch.where(right == left, torch.zeros_like(t), t)
    return left, t.float()


def scalar_schedule(
    keyframes: Sequence[Keyframe], key: str, default: float, indices: Sequence[int]
) -> torch.Tensor:
    """``key``'s value ``(n,)`` at every frame of ``indices``: linear between the keyframes
    that give it, held outside them; ``default`` everywhere when none does."""
    given = [(k.frame, k.values[key]) for k in keyframes if key in k.values]
    if not given:
        return torch.full((len(indices),), float(default))
    left, t = interpolation([f for f, _ in given], indices)
    values = torch.tensor([v for _, v in given])
    right = (left + 1).clamp(max=len(given) - 1)
    return (1 - t) * values[left] + t * values[right]


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of ``a`` and ``b`` ``(..., D)`` at ``t`` (broadcast on the
    leading dims): the direction along the great circle, the norm linearly; parallel
    vectors fall back to the linear blend."""
    t = t.view(*t.shape, *([1] * (a.ndim - t.ndim)))
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    linear = sin.abs() < 1e-6
    wa = torch.where(linear, 1 - t, torch.sin((1 - t) * angle) / sin.where(~linear, 1.0))
    wb = torch.where(linear, t, torch.sin(t * angle) / sin.where(~linear, 1.0))
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return direction * ((1 - t) * na + t * nb)


def content_schedule(
    frames: Sequence[int], embeddings: torch.Tensor, indices: Sequence[int]
) -> torch.Tensor:
    """Content embeddings at every frame of ``indices``: ``embeddings`` ``(K, ..., D)`` are
    those of the keyframes at ``frames`` (sorted); returns ``(n, ..., D)``, slerped between
    keyframes, held outside them."""
    left, t = interpolation(frames, indices)
    right = (left + 1).clamp(max=len(frames) - 1)
    return slerp(embeddings[left], embeddings[right], t)
