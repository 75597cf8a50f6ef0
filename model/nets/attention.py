"""Self and cross attention on ``scaled_dot_product_attention``, in SD's module layout.

Parameter names follow the original ``ldm.modules.attention`` code (``to_q``, ``to_k``,
``to_v``, ``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``, ``norm1..3``) so that Stable
Diffusion checkpoints load by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.nets.frames import Frames


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself when ``context`` is None)."""

    # Self-attention's q, k and v in one matrix product of the concatenated weights (faster
    # with plain weights; ``model.weights.prepack`` turns it off, prepacked weights being separate).
    fuse_qkv = True

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        anchors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(batch, tokens, query_dim)``. ``anchors`` (self-attention only): a long
        tensor ``(F, A)``; the batch is then clips of F frames, ``(b f)``, and frame k attends
        to the tokens of frames ``anchors[k]`` of its clip (cross-frame attention)."""
        if context is None and self.fuse_qkv:
            weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = F.linear(x, weight).chunk(3, dim=-1)
        else:
            source = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        if anchors is not None:
            if context is not None:
                raise ValueError("cross-frame anchors apply to self-attention only")
            k, v = anchor_tokens(k, anchors), anchor_tokens(v, anchors)
        out = multi_head_attention(q, k, v, self.heads)
        return self.to_out(out)


def anchor_tokens(tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Per frame, the tokens of its anchor frames: ``(b f, n, d)`` -> ``(b f, A n, d)`` with
    ``anchors`` ``(f, A)`` indexing frames of the same clip."""
    count, width = anchors.shape
    if tokens.shape[0] % count or anchors.min() < 0 or anchors.max() >= count:
        raise ValueError(
            f"anchors {tuple(anchors.shape)} do not index clips of {count} frames in a batch "
            f"of {tokens.shape[0]}"
        )
    clips = tokens.unflatten(0, (-1, count))  # (b, f, n, d)
    gathered = clips[:, anchors.to(tokens.device)]  # (b, f, A, n, d)
    return gathered.flatten(2, 3).flatten(0, 1)


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> torch.Tensor:
    """SDPA on ``(batch, tokens, heads * dim_head)`` tensors; returns the same layout."""
    batch, tokens, inner = q.shape
    dim_head = inner // heads
    q, k, v = (t.unflatten(-1, (heads, dim_head)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, tokens, inner)


class GEGLU(nn.Module):
    """A linear layer whose output half gates the other half through GELU (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer MLP of SD: GEGLU up-projection by ``mult``, dropout, down-projection."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, and feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, frames: Frames | None = None
    ) -> torch.Tensor:
        anchors = frames.anchors if frames is not None else None
        x = x + self.attn1(self.norm1(x), anchors=anchors)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))
