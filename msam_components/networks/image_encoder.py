"""SAM-Med3D's 3-D ViT image encoder: ``[B, 1, 128, 128, 128] -> [B, out_chans, 8, 8, 8]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import LayerNorm3d, MLPBlock
from .rel_pos_attention import RelPosSelfAttention


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; windowed when ``window_size > 0``.

    Windows are zero-padded and the padding is not masked, as in SAM-Med3D (``reference_attention.window_partition``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        grid_size: tuple[int, int, int],
        window_size: int = 0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        rel_pos_layout: str = "sam-med3d",
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        attn_size = grid_size if window_size == 0 else (window_size,) * 3
        self.attn = RelPosSelfAttention(dim, num_heads, attn_size, qkv_bias=qkv_bias, rel_pos_layout=rel_pos_layout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        x = self.attn(x) if self.window_size == 0 else self.attn.windowed(x, self.window_size)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches to channels-last tokens: ``[B, C_in, S, S, S] -> [B, S/p, S/p, S/p, dim]``."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoderViT3D(nn.Module):
    """ViT image encoder with absolute and relative positions, global blocks at ``global_attn_indexes`` and a conv neck.

    Its attention runs on the compute path its blocks hold (``compute_paths.set_attention_impl``; no parameters).
    """

    def __init__(
        self,
        image_size: int = 128,
        patch_size: int = 16,
        in_channels: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        window_size: int = 14,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        rel_pos_layout: str = "sam-med3d",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        grid = image_size // patch_size
        self.grid_size = (grid, grid, grid)
        self.patch_embed = PatchEmbed3D(patch_size, in_channels, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {list(global_attn_indexes)} out of range for depth {depth}")
        self.blocks = nn.ModuleList(
            EncoderBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                self.grid_size,
                window_size=0 if i in global_attn_indexes else window_size,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                rel_pos_layout=rel_pos_layout,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.image_size,) * 3
        if x.ndim != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"image encoder expects [B, C, {expected[0]}, {expected[1]}, {expected[2]}], got {list(x.shape)}"
            )
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
