"""infer.py's ``lora=[{file: ..., weight: 0.8}, ...]``: the files read and checked before any
input is decoded, then merged into the loaded model (an SD file's UNet and text encoder; a
Gen-1 checkpoint's UNet, which takes an SD 1.5 LoRA's UNet part) and described for the
sidecar."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from jobs.editing.request import InferError
from model.sd.frame_lora import FrameLoras
from model.sd.lora import LoraFile, MergedLoras, merge_loras, read_lora
from model.weights.atomic import file_sha256
from model.weights.checkpoint import CheckpointError


def requested_loras(cfg: DictConfig) -> list[tuple[LoraFile, float]]:
    """The ``lora`` entries, each ``{file: PATH, weight: W}`` (weight default 1.0) or a bare
    ``PATH``, read and checked; any problem is one ``InferError`` line naming the entry."""
    entries = cfg.get("lora") or []
    if not isinstance(entries, list | ListConfig):
        raise InferError(
            f"lora must be a list like [{{file: X.safetensors, weight: 0.8}}], got {entries!r}"
        )
    loras = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"file": entry}
        entry = OmegaConf.to_container(entry) if not isinstance(entry, dict) else entry
        unknown = sorted(set(entry) - {"file", "weight"})
        if unknown or not entry.get("file"):
            raise InferError(
                f"lora[{i}]: give {{file: X.safetensors, weight: 0.8}}"
                + (f" (unknown keys: {', '.join(unknown)})" if unknown else " (no file)")
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InferError(f"lora[{i}]: weight must be a number, got {weight!r}")
        path = Path(entry["file"])
        if not path.is_file():
            raise InferError(f"lora[{i}]: LoRA file not found: {path}")
        try:
            loras.append((read_lora(path), float(weight)))
        except CheckpointError as err:
            raise InferError(f"lora[{i}]: {err}") from None
    return loras


def apply_loras(
    model, loras: list[tuple[LoraFile, float]], kind: str, keyframed: bool = False
) -> list[dict]:
    """Merge ``loras`` into ``model`` (a ``StableDiffusion`` for ``kind`` "sd", else a Gen1,
    whose text-encoder parts are skipped: it is conditioned on CLIP image embeddings).
    ``keyframed``: the keyframes give the weights per frame, so the UNet parts go on as
    ``model.frame_loras`` (``model.sd.frame_lora``: a weight per frame) and only text-encoder
    parts are merged, at each entry's weight. Returns the sidecar's ``lora`` list: file,
    sha256, weight, format, layers changed, parts applied and skipped. Unmatched keys raise
    ``InferError`` (one line)."""
    if not loras:
        return []
    text = model.text_encoder if kind == "sd" else None
    unet = model.sampling_unet()
    try:
        if keyframed:
            model.frame_loras = FrameLoras([lora for lora, _ in loras], unet)
            texts = [(_text_part(lora), w) for lora, w in loras] if text is not None else []
            texts = [(part, w) for part, w in texts if part.pairs]
            merge_loras(texts, unet, text)  # prompts are encoded once: their LoRA stays merged
            merged_text = {part.path for part, _ in texts}
            return [_keyframed_entry(lora, w, lora.path in merged_text) for lora, w in loras]
        merged: MergedLoras = merge_loras(loras, unet, text, skip_text=kind != "sd")
    except CheckpointError as err:
        raise InferError(str(err)) from None
    return [
        {
            **applied,
            "file": str(Path(applied["file"]).resolve()),
            "sha256": file_sha256(applied["file"]),
        }
        for applied in merged.applied
    ]


def _keyframed_entry(lora: LoraFile, weight: float, text: bool) -> dict:
    """The sidecar's record of a LoRA whose UNet weight the keyframes schedule (``text``:
    its text-encoder part was merged at ``weight``)."""
    return {
        "file": str(Path(lora.path).resolve()),
        "sha256": file_sha256(lora.path),
        "weight": "keyframed (sidecar keyframes.schedule lora.<i>)",
        "text_encoder_weight": weight if text else None,
        "format": lora.format,
        "parts": [p for p in lora.parts() if p == "unet" or (p == "text" and text)],
    }


def _text_part(lora: LoraFile) -> LoraFile:
    """The file's text-encoder pairs alone."""
    return replace(lora, pairs=[p for p in lora.pairs if p.part != "unet"])
