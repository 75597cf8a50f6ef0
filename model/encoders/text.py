"""Stable Diffusion's text encoders, with state-dict keys exactly the checkpoints' own.

- SD 1.x: OpenAI CLIP ViT-L/14's text transformer in Hugging Face's layout, as
  ``FrozenCLIPEmbedder`` (``ldm/modules/encoders/modules.py``) runs
  ``transformers.CLIPTextModel``: keys under ``cond_stage_model.transformer.text_model.``
  (older files: ``cond_stage_model.transformer.``), QuickGELU, causal self-attention;
  output ``last_hidden_state``, the last layer after ``final_layer_norm``: ``(B, 77, 768)``.
- SD 2.x: OpenCLIP ViT-H/14's text tower in open_clip's layout, as
  ``FrozenOpenCLIPEmbedder(layer="penultimate")`` runs it: keys under
  ``cond_stage_model.model.``, exact GELU, causal; output the penultimate block's hidden
  state through ``ln_final``: ``(B, 77, 1024)``. ``text_projection`` and ``logit_scale`` are
  in the file and loaded, but unused.

``clip_skip`` is A1111's "CLIP stop at last layers": the hidden state after all but the
last ``clip_skip - 1`` blocks, through the final LayerNorm. 1 is SD 1.x's behaviour; 2 is
SD 2.x's penultimate layer (its default here). Outputs are unbounded real features.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.encoders.tokenizer import ClipTokenizer
from model.weights.checkpoint import CheckpointError, load_strict, read_state_dict, select

log = logging.getLogger(__name__)

Kind = Literal["sd1", "sd2"]
SD1_PREFIX = "cond_stage_model.transformer."  # then text_model. (transformers >= 4.x files)
SD2_PREFIX = "cond_stage_model.model."
POSITION_IDS = "embeddings.position_ids"  # a buffer some SD 1.x files carry; never loaded
DEFAULT_CLIP_SKIP: dict[str, int] = {"sd1": 1, "sd2": 2}


@dataclass(frozen=True)
class TextConfig:
    """Dimensions of a CLIP text transformer. ``mlp_width`` defaults to ``4 * width``,
    ``proj_dim`` (SD 2.x's unused ``text_projection`` columns) to ``width``."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    mlp_width: int | None = None
    proj_dim: int | None = None


SD1_CONFIG = TextConfig(width=768, layers=12, heads=12, mlp_width=3072)  # OpenAI ViT-L/14
SD2_CONFIG = TextConfig(1024, layers=24, heads=16, mlp_width=4096, proj_dim=1024)  # ViT-H/14


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head causal self-attention of ``(B, L, D)`` projections -> ``(B, L, D)``."""
    b, n, d = q.shape
    q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, n, d)


class HFLayer(nn.Module):
    """``transformers`` ``CLIPEncoderLayer``: pre-norm attention and QuickGELU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        names = ("q_proj", "k_proj", "v_proj", "out_proj")
        self.self_attn = nn.ModuleDict({n: nn.Linear(width, width) for n in names})
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(width, mlp_width), "fc2": nn.Linear(mlp_width, width)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, h = self.self_attn, self.layer_norm1(x)
        x = x + a.out_proj(causal_attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads))
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


class OpenClipAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed q, k, v), causal, batch first."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class OpenClipBlock(nn.Module):
    """open_clip ``ResidualAttentionBlock``: pre-norm attention and exact-GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = OpenClipAttention(width, heads)
        self.mlp = nn.ModuleDict(
            {"c_fc": nn.Linear(width, mlp_width), "c_proj": nn.Linear(mlp_width, width)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class TextEncoder(nn.Module):
    """Common front: prompts or token ids -> SD's cross-attention context ``(B, L, D)``.

    Subclasses hold the checkpoint's layout and define ``embed``, ``blocks`` and ``norm``.
    ``forward`` is differentiable; ``encode`` tokenizes, moves the ids to the module's
    device and runs without gradients, returning the module's dtype.
    """

    kind: Kind

    def __init__(self, config: TextConfig, clip_skip: int | None, fix_text: bool) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = ClipTokenizer(
            self.kind, fix_text=fix_text, context_length=config.context_length
        )
        self.clip_skip = DEFAULT_CLIP_SKIP[self.kind] if clip_skip is None else clip_skip

    @property
    def clip_skip(self) -> int:
        """Final blocks skipped plus one (1: all blocks run); 1 <= clip_skip <= layers."""
        return self._clip_skip

    @clip_skip.setter
    def clip_skip(self, value: int) -> None:
        if not 1 <= value <= self.config.layers:
            raise ValueError(f"clip_skip must be in 1..{self.config.layers}, got {value}")
        self._clip_skip = value

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def norm(self) -> nn.LayerNorm:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)``, L <= context length, ids < vocab size -> ``(B, L, width)``.

        Raises ``ValueError`` for a wrong shape or an id outside the vocabulary.
        """
        c = self.config
        if tokens.ndim != 2 or not 0 < tokens.shape[1] <= c.context_length:
            raise ValueError(
                f"expected token ids (B, <= {c.context_length}), got {tuple(tokens.shape)}"
            )
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < c.vocab_size:
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}) for this text encoder")
        x = self.embed(tokens)
        for block in self.blocks()[: c.layers - self.clip_skip + 1]:
            x = block(x)
        return self.norm()(x)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(B, context_length)`` int64 ids on CPU, as this SD generation makes them."""
        return self.tokenizer(prompts)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(B, 77, width)`` in the module's dtype and device, without gradients.

        ``encode([""])`` is SD's unconditional context (the empty prompt, not zeros).
        """
        tokens = self.tokenize(prompts).to(self.norm().weight.device)
        with torch.no_grad():
            return self(tokens)


class SD1TextEncoder(TextEncoder):
    """SD 1.x: ``transformers.CLIPTextModel`` (QuickGELU), keys as its ``text_model.``."""

    kind = "sd1"

    def __init__(
        self, config: TextConfig = SD1_CONFIG, clip_skip: int | None = None, fix_text: bool = True
    ) -> None:
        super().__init__(config, clip_skip, fix_text)
        c = config
        tables = {"token_embedding": c.vocab_size, "position_embedding": c.context_length}
        self.embeddings = nn.ModuleDict({k: nn.Embedding(n, c.width) for k, n in tables.items()})
        mlp = c.mlp_width or 4 * c.width
        layers = nn.ModuleList(HFLayer(c.width, c.heads, mlp) for _ in range(c.layers))
        self.encoder = nn.ModuleDict({"layers": layers})
        self.final_layer_norm = nn.LayerNorm(c.width)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.embeddings.position_embedding.weight[: tokens.shape[1]]
        return self.embeddings.token_embedding(tokens) + positions

    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    def norm(self) -> nn.LayerNorm:
        return self.final_layer_norm


class SD2TextEncoder(TextEncoder):
    """SD 2.x: open_clip's text tower (exact GELU), keys as ``open_clip.CLIP`` less visual."""

    kind = "sd2"

    def __init__(
        self, config: TextConfig = SD2_CONFIG, clip_skip: int | None = None, fix_text: bool = True
    ) -> None:
        super().__init__(config, clip_skip, fix_text)
        c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(c.context_length, c.width))
        mlp = c.mlp_width or 4 * c.width
        blocks = nn.ModuleList(OpenClipBlock(c.width, c.heads, mlp) for _ in range(c.layers))
        self.transformer = nn.ModuleDict({"resblocks": blocks})
        self.ln_final = nn.LayerNorm(c.width)
        self.text_projection = nn.Parameter(torch.empty(c.width, c.proj_dim or c.width))
        nn.init.normal_(self.text_projection, std=c.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def norm(self) -> nn.LayerNorm:
        return self.ln_final


ENCODERS: dict[str, type[TextEncoder]] = {"sd1": SD1TextEncoder, "sd2": SD2TextEncoder}
# Per kind: (token embedding, position table, block key pattern, MLP input weight).
_SHAPE_KEYS: dict[str, tuple[str, str, str, str]] = {
    "sd1": (
        "embeddings.token_embedding.weight",
        "embeddings.position_embedding.weight",
        r"encoder\.layers\.(\d+)\.",
        "encoder.layers.0.mlp.fc1.weight",
    ),
    "sd2": (
        "token_embedding.weight",
        "positional_embedding",
        r"transformer\.resblocks\.(\d+)\.",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ),
}


def config_from_state(
    state: Mapping[str, torch.Tensor],
    kind: Kind,
    heads: int | None = None,
    path: str | Path = "<state dict>",
) -> TextConfig:
    """Width, layers, vocab, context (and MLP / projection widths) read from a text
    encoder's (prefix-free) keys; ``heads`` defaults to ``width // 64``, as in both CLIPs.

    Raises ``CheckpointError`` naming ``path`` and the keys it lacks.
    """
    if kind not in ENCODERS:
        raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")
    tokens, positions, block, mlp = _SHAPE_KEYS[kind]
    lacking = [k for k in (tokens, positions, mlp) if k not in state]
    if lacking:
        prefix = f"{SD1_PREFIX}text_model." if kind == "sd1" else SD2_PREFIX
        raise CheckpointError(
            f"{path}: no {kind} text encoder: lacks {', '.join(lacking)} (under {prefix!r})"
        )
    vocab, width = state[tokens].shape
    indices = {int(m.group(1)) for k in state if (m := re.match(block, k))}
    proj = state.get("text_projection")
    return TextConfig(
        width=width,
        layers=max(indices) + 1,
        heads=heads or max(width // 64, 1),
        vocab_size=vocab,
        context_length=state[positions].shape[0],
        mlp_width=state[mlp].shape[0],
        proj_dim=None if proj is None else proj.shape[1],
    )


def text_state(
    state: Mapping[str, torch.Tensor], kind: Kind, path: str | Path = "<state dict>"
) -> dict[str, torch.Tensor]:
    """The text encoder's tensors of a full SD checkpoint or a bare file, keyed as our module.

    sd1: keys under ``cond_stage_model.transformer.``, with or without ``text_model.``
    (bare ``text_model.*`` files too); ``embeddings.position_ids`` is dropped (positions are
    always 0..L-1; a file whose ids differ is logged). sd2: keys under
    ``cond_stage_model.model.``; a bare open_clip file loses its ``visual.*`` tower.
    """
    if kind not in ENCODERS:
        raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")
    if kind == "sd1":
        out = select(state, SD1_PREFIX, path)
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
        ids = out.pop(POSITION_IDS, None)
        if ids is not None and not torch.equal(
            ids.flatten().double(), torch.arange(ids.numel(), dtype=torch.double)
        ):
            log.warning("%s: ignored %s that are not 0..%d", path, POSITION_IDS, ids.numel() - 1)
        return out
    out = select(state, SD2_PREFIX, path)
    return {k: v for k, v in out.items() if not k.startswith("visual.")}


def build_text_encoder(
    kind: Kind = "sd1",
    config: TextConfig | None = None,
    *,
    clip_skip: int | None = None,
    fix_text: bool = True,
) -> TextEncoder:
    """A text encoder with random weights (default: the real SD 1.x / SD 2.x sizes)."""
    if kind not in ENCODERS:
        raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")
    default = SD1_CONFIG if kind == "sd1" else SD2_CONFIG
    return ENCODERS[kind](config or default, clip_skip=clip_skip, fix_text=fix_text)


def load_text_encoder(
    state_or_path: str | Path | Mapping[str, torch.Tensor],
    kind: Kind = "sd1",
    *,
    heads: int | None = None,
    clip_skip: int | None = None,
    fix_text: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TextEncoder:
    """The text encoder of an SD checkpoint (file or state dict), loaded strictly, frozen.

    Dimensions come from the tensors' shapes (``config_from_state``). Raises
    ``FileNotFoundError`` for a missing file and ``CheckpointError`` (naming the file and the
    keys) for an unreadable file, a missing encoder, or missing, unexpected or misshapen keys.
    Weights are cast to ``dtype`` (default float32) and moved to ``device``.
    """
    if isinstance(state_or_path, Mapping):
        path, full = "<state dict>", state_or_path
    else:
        path, full = str(state_or_path), read_state_dict(state_or_path)
    state = text_state(full, kind, path)
    config = config_from_state(state, kind, heads, path)
    encoder = build_text_encoder(kind, config, clip_skip=clip_skip, fix_text=fix_text)
    load_strict(encoder, state, path)
    encoder = encoder.to(device=device, dtype=dtype or torch.float32)
    return encoder.eval().requires_grad_(False)
