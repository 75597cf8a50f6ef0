"""Content embeddings of an edit: CLIP image embeddings of a reference, or of text.

Gen-1's content is a CLIP image embedding; a text prompt reaches it through a prior (as
DALL-E 2's) or is used as its raw CLIP text embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PROMPT_MODES = ("prior", "direct")


def image_content(gen1, images: torch.Tensor) -> torch.Tensor:
    """Content ``(B, 1, D)`` from reference images ``(B, 3, H, W)`` in [-1, 1]."""
    device = next(gen1.clip.parameters()).device
    return gen1.encode_content(images.to(device)).float()


def text_content(
    gen1, prompts: str | list[str], mode: str = "prior", prior: Callable | None = None
) -> torch.Tensor:
    """Content ``(B, 1, D)`` from text: CLIP text embedding through ``prior`` (mode "prior",
    as DALL-E 2's prior maps text to image embeddings), or as is (mode "direct")."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {mode!r}")
    if mode == "prior" and prior is None:
        raise ValueError(
            "a prompt needs a prior that maps CLIP text to image embeddings, and none is "
            "configured; set prompt_mode=direct to use the CLIP text embedding as is"
        )
    embedding = gen1.clip.encode_text(prompts).float()
    return (prior(embedding) if mode == "prior" else embedding)[:, None]
