"""Multi-head self-attention on a 3-D token grid with decomposed relative position terms (MViTv2 / SAM style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
ATTENTION_IMPLS = ("reference", "fast")


def check_attention_impl(attention_impl: str) -> str:
    """Validate an ``attention_impl`` value: ``"reference"`` (explicit softmax, padded windows) or ``"fast"``."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    return attention_impl


def set_attention_impl(module: nn.Module, attention_impl: str) -> None:
    """Switch ``module`` and every submodule with an ``attention_impl`` to ``attention_impl`` (no parameter changes).

    That covers the attention layers, the MEA and the mask decoder, whose fast per-click paths follow the same switch.
    """
    check_attention_impl(attention_impl)
    for sub in module.modules():
        if hasattr(sub, "attention_impl"):
            sub.attention_impl = attention_impl


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


class RelPosSelfAttention(nn.Module):
    """Self-attention over a channels-last ``[B, D, H, W, C]`` grid with fused ``qkv`` and decomposed relative positions.

    Logits are ``(q * scale) @ k^T + rel_d + rel_h + rel_w`` where the relative terms use the unscaled queries, as in
    SAM-Med3D. ``input_size`` fixes the relative-position table lengths (``2 * size - 1`` per axis);
    ``rel_pos_layout`` selects how the per-axis terms are broadcast (see :func:`add_rel_pos`). ``attention_impl="fast"``
    computes the same logits with ``scaled_dot_product_attention`` (see ``fast_attention.py``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_size: tuple[int, int, int],
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        rel_pos_layout: str = "sam-med3d",
        attention_impl: str = "reference",
    ) -> None:
        super().__init__()
        self.attention_impl = check_attention_impl(attention_impl)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv: nn.Module = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_layout not in REL_POS_LAYOUTS:
            raise ValueError(f"rel_pos_layout must be one of {REL_POS_LAYOUTS}, got {rel_pos_layout!r}")
        self.rel_pos_layout = rel_pos_layout
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention_impl == "fast":
            from .fast_attention import global_attention  # local import: fast_attention imports this module

            return global_attention(self, x)
        b, d, h, w, c = x.shape
        n = d * h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, c // self.num_heads).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            terms = decomposed_rel_pos_terms(q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, (d, h, w))
            attn = add_rel_pos(attn, terms, (d, h, w), self.rel_pos_layout)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).view(b, self.num_heads, d, h, w, c // self.num_heads)
        out = out.permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, c)
        return self.proj(out)
