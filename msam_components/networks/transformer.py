"""Two-way transformer of the mask decoder: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch
from torch import nn

from .layers import MLPBlock


class TokenAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, optionally to a reduced internal width."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError(f"internal dim {self.internal_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of ``q`` ``[B, Nq, C]`` to ``k``/``v`` ``[B, Nk, C]``; ``key_bias`` ``[B, Nk]`` is added to the logits
        (``-inf`` leaves a key out, so padding tokens change nothing)."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        if key_bias is not None:
            attn = attn + key_bias[:, None, None, :].to(attn.dtype)
        out = attn.softmax(dim=-1) @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention (post-norm)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = TokenAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.cross_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.norm4 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.cross_attn_image_to_token = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        token_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Updated (tokens, image tokens); ``token_bias`` ``[B, N_tokens]`` masks tokens out wherever they are keys."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_bias)  # no residual in the first layer (SAM)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_bias)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_bias))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """``depth`` two-way blocks then a final token->image attention and LayerNorm."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 384,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim, eps=norm_eps)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        token_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_embedding``/``image_pe`` ``[B, C, D, H, W]``, tokens ``[B, N, C]`` -> (tokens, image tokens ``[B, DHW, C]``).

        ``token_bias`` ``[B, N]`` (0 or ``-inf``) leaves tokens out of every attention where they are keys.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, token_bias)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
