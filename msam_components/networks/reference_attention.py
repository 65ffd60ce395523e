"""The reference attention computations: explicit softmax over all tokens, and SAM's zero-padded windows.

Straightforward on purpose: every fast function in ``fast_attention.py`` is tested against these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .rel_pos import AttentionWeights, add_rel_pos, decomposed_rel_pos_terms

Attend = Callable[[AttentionWeights, torch.Tensor], torch.Tensor]


def dense_attention(attn: AttentionWeights, x: torch.Tensor) -> torch.Tensor:
    """``attn`` over all tokens of channels-last ``x`` ``[B, D, H, W, C]``: ``softmax((q * scale) k^T + rel) v``."""
    b, d, h, w, c = x.shape
    n, nh = d * h * w, attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * nh, n, c // nh).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        terms = decomposed_rel_pos_terms(q, attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w, (d, h, w))
        logits = add_rel_pos(logits, terms, (d, h, w), attn.rel_pos_layout)
    out = (logits.softmax(dim=-1) @ v).view(b, nh, d, h, w, c // nh)
    return attn.proj(out.permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, c))


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad ``[B, D, H, W, C]`` up to multiples of ``window_size`` and cut it into ``[B*nW, ws, ws, ws, C]`` windows.

    At the 8^3 token grid and window 14 this yields one 14^3 window whose 2232 padding tokens are NOT masked: the
    pretrained SAM-Med3D weights were trained that way, so the padding is part of the model.
    """
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % window_size, (-h) % window_size, (-w) % window_size
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    ws = window_size
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (dp, hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_size: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: reassemble windows and crop the padding away."""
    dp, hp, wp = padded_size
    d, h, w = size
    ws = window_size
    b = windows.shape[0] // ((dp // ws) * (hp // ws) * (wp // ws))
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w, :].contiguous()


def windowed_attention(
    attn: AttentionWeights, x: torch.Tensor, window_size: int, attend: Attend = dense_attention
) -> torch.Tensor:
    """``attend`` within each zero-padded window of ``x`` ``[B, D, H, W, C]``, padding cropped from the result."""
    windows, padded = window_partition(x, window_size)
    return window_unpartition(attend(attn, windows), window_size, padded, tuple(x.shape[1:4]))
