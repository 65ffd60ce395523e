"""Multi-head self-attention on a 3-D token grid with decomposed relative position terms (MViTv2 / SAM style)."""

from __future__ import annotations

import torch
from torch import nn

from .compute_paths import UsesComputePath
from .rel_pos import REL_POS_LAYOUTS


class RelPosSelfAttention(UsesComputePath, nn.Module):
    """Self-attention over a channels-last ``[B, D, H, W, C]`` grid with fused ``qkv`` and decomposed relative positions.

    Logits are ``(q * scale) @ k^T + rel_d + rel_h + rel_w`` where the relative terms use the unscaled queries, as in
    SAM-Med3D. ``input_size`` fixes the relative-position table lengths (``2 * size - 1`` per axis);
    ``rel_pos_layout`` selects how the per-axis terms are broadcast (see :func:`rel_pos.add_rel_pos`). Its compute path
    picks the computation (``compute_paths.py``): explicit softmax (reference) or ``scaled_dot_product_attention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_size: tuple[int, int, int],
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        rel_pos_layout: str = "sam-med3d",
    ) -> None:
        super().__init__()
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
        """Attention over all tokens of channels-last ``x`` ``[B, D, H, W, C]``."""
        return self.path.attention(self, x)

    def windowed(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """Attention within SAM's zero-padded windows of ``window_size`` tokens per side."""
        return self.path.windowed_attention(self, x, window_size)
