"""Decomposed relative-position terms of 3-D self-attention (MViTv2 / SAM style): tables, per-axis terms, layouts."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionWeights(Protocol):
    """What the attention computations (``reference_attention``, ``fast_attention``) read of an attention module
    (:class:`rel_pos_attention.RelPosSelfAttention`): its projections, heads and relative-position tables."""

    qkv: nn.Module
    proj: nn.Module
    num_heads: int
    scale: float
    use_rel_pos: bool
    rel_pos_layout: str
    rel_pos_d: torch.Tensor
    rel_pos_h: torch.Tensor
    rel_pos_w: torch.Tensor


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the ``[q_size, k_size, head_dim]`` table of relative-position vectors for one axis.

    ``rel_pos`` holds ``2 * max(q_size, k_size) - 1`` rows; a table of another length is linearly resized first.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        resized = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear", align_corners=False)
        rel_pos = resized.squeeze(0).t()
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[index.long()]


def decomposed_rel_pos_terms(
    q: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis logit terms for queries ``q`` ``[BH, D*H*W, c]`` (unscaled): each ``[BH, D, H, W, size_axis]``."""
    d, h, w = size
    r_q = q.reshape(q.shape[0], d, h, w, q.shape[-1])
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, relative_position_table(d, d, rel_pos_d))
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, relative_position_table(h, h, rel_pos_h))
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, relative_position_table(w, w, rel_pos_w))
    return rel_d, rel_h, rel_w


REL_POS_LAYOUTS = ("sam-med3d", "decomposed")


def add_rel_pos(
    attn: torch.Tensor,
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    size: tuple[int, int, int],
    layout: str = "sam-med3d",
) -> torch.Tensor:
    """Add the per-axis terms to logits ``[BH, N, N]`` (query index first, key index second, both in (d, h, w) order).

    ``"decomposed"`` is the intended MViTv2 sum: at query ``(i, j, l)`` and key ``(p, q, r)`` it adds
    ``rel_d[i,j,l,p] + rel_h[i,j,l,q] + rel_w[i,j,l,r]``.

    ``"sam-med3d"`` reproduces how SAM-Med3D (and M-SAM's adapter) actually broadcast the terms, which the pretrained
    weights were trained with: it adds ``rel_d[i,j,l,r] + rel_h[i,j,p,r] + rel_w[i,j,q,r]``, i.e. every table is
    indexed by the key's w coordinate and two terms read the query at a key coordinate. It only broadcasts on cubic
    grids (always true here: 8^3 and 14^3 windows).
    """
    d, h, w = size
    bh = attn.shape[0]
    rel_d, rel_h, rel_w = terms
    attn = attn.view(bh, d, h, w, d, h, w)
    if layout == "decomposed":
        attn = attn + rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
    elif layout == "sam-med3d":
        if not d == h == w:
            raise ValueError(f"rel_pos_layout='sam-med3d' needs a cubic token grid, got {size}")
        attn = (
            attn
            + rel_d[:, :, :, :, None, None, :]
            + rel_h[:, :, :, None, :, None, :]
            + rel_w[:, :, :, None, None, :, :]
        )
    else:
        raise ValueError(f"rel_pos_layout must be one of {REL_POS_LAYOUTS}, got {layout!r}")
    return attn.view(bh, d * h * w, d * h * w)
