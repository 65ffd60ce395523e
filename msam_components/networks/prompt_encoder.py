"""Point and mask prompt encoder of SAM-Med3D, including the upstream quirks that the pretrained weights depend on."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import LayerNorm3d
from .mask_input import FactoredDense


class RandomFourierPE3D(nn.Module):
    """Random-Fourier positional encoding of 3-D coordinates in ``[0, 1]`` into ``3 * num_pos_feats`` channels.

    Layout is ``[sin, cos, sin]`` (sin twice), exactly as SAM-Med3D: the pretrained decoder expects it.
    """

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(3, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``[..., 3]`` normalised coordinates to ``[..., 3 * num_pos_feats]``."""
        g = self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * ((2 * coords.to(g.dtype) - 1) @ g)
        return torch.cat([torch.sin(proj), torch.cos(proj), torch.sin(proj)], dim=-1)

    def dense(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense grid encoding ``[C, D, H, W]``; slot 0 carries the H coordinate and slot 1 the D coordinate.

        This D/H swap relative to the point encoding is SAM's 2-D (x=column, y=row) convention carried into 3-D.
        """
        g = self.positional_encoding_gaussian_matrix
        axes = [(torch.arange(n, device=g.device, dtype=g.dtype) + 0.5) / n for n in size]
        dd, hh, ww = torch.meshgrid(*axes, indexing="ij")
        return self.encode(torch.stack([hh, dd, ww], dim=-1)).permute(3, 0, 1, 2)


class PromptEncoder3D(nn.Module):
    """Embeds clicks (sparse tokens) and the previous low-resolution logits (dense map) for the mask decoder."""

    def __init__(
        self,
        embed_dim: int = 384,
        image_embedding_size: tuple[int, int, int] = (8, 8, 8),
        input_image_size: tuple[int, int, int] = (128, 128, 128),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        if embed_dim % 3:
            raise ValueError(
                f"prompt embed_dim must be divisible by 3 for the [sin, cos, sin] encoding, got {embed_dim}"
            )
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        # a buffer, not a tensor built per call: the forward makes no tensor from host data (CUDA-graph capture);
        # non-persistent, so state dicts and checkpoints are unchanged
        self.register_buffer("input_scale", torch.tensor(self.input_image_size, dtype=torch.float32), persistent=False)
        self.pe_layer = RandomFourierPE3D(embed_dim // 3)
        # index 0: negative click, index 1: positive click (SAM's box-corner embeddings do not exist here)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, ``[1, C, 8, 8, 8]``."""
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """Embed ``[B, N, 3]`` voxel indices ``(d, h, w)`` with labels ``[B, N]`` (1 pos, 0 neg, -1 padding).

        Coordinates are shifted to voxel centres (+0.5) and divided by the input size per axis. With ``pad`` one padding
        point (origin, label -1) is appended, as SAM-Med3D does whenever no box is given.
        """
        dtype = self.pe_layer.positional_encoding_gaussian_matrix.dtype
        coords = points.to(dtype) + 0.5
        labels = labels.to(torch.long)
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.encode(coords / self.input_scale.to(dtype))
        is_pad, is_neg, is_pos = (labels == -1)[..., None], (labels == 0)[..., None], (labels == 1)[..., None]
        emb = torch.where(is_pad, torch.zeros_like(emb), emb)
        emb = emb + is_pad * self.not_a_point_embed.weight
        emb = emb + is_neg * self.point_embeddings[0].weight
        return emb + is_pos * self.point_embeddings[1].weight

    def embed_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """The paper's "mask encoder": ``[B, 1, 32, 32, 32]`` logits -> ``[B, C, 8, 8, 8]``."""
        self._check_mask_shape(masks)
        return self.mask_downscaling(masks)

    def _check_mask_shape(self, masks: torch.Tensor) -> None:
        if tuple(masks.shape[1:]) != (1, *self.mask_input_size):
            raise ValueError(
                f"low-res mask must be [B, 1, {', '.join(map(str, self.mask_input_size))}], got {list(masks.shape)}"
            )

    def factored_mask_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [C, k], bias [C])`` of the mask encoder's last (1x1x1) convolution, which the fast path factors."""
        last = self.mask_downscaling[-1]
        if not (isinstance(last, nn.Conv3d) and last.kernel_size == (1, 1, 1)):
            raise TypeError("the mask encoder must end in a 1x1x1 Conv3d to be factored")
        return last.weight.flatten(1), last.bias

    def factored_dense_embedding(self, masks: torch.Tensor | None, batch_size: int) -> FactoredDense:
        """:meth:`dense_embedding` as a :class:`FactoredDense` (the same values once materialised)."""
        weight, bias = self.factored_mask_parameters()
        if masks is None:
            no_mask = self.no_mask_embed.weight
            z = no_mask.new_zeros(batch_size, 0, *self.image_embedding_size)
            return FactoredDense(z, no_mask.new_zeros(self.embed_dim, 0), no_mask[0])
        self._check_mask_shape(masks)
        return FactoredDense(self.mask_downscaling[:-1](masks), weight, bias)

    def dense_embedding(self, masks: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """``[B, C, 8, 8, 8]``: :meth:`embed_mask` of the low-res logits, or the learned no-mask embedding."""
        if masks is not None:
            return self.embed_mask(masks)
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch_size, -1, *self.image_embedding_size)

    def sparse_embedding(
        self, points: torch.Tensor | None, labels: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        """``[B, N+1, C]`` click tokens (``[B, 0, C]`` without points)."""
        if points is None:
            return self.not_a_point_embed.weight.new_zeros(batch_size, 0, self.embed_dim)
        if labels is None:
            raise ValueError("point_labels must be given together with points")
        return self.embed_points(points, labels, pad=True)

    def forward(
        self, points: torch.Tensor | None, labels: torch.Tensor | None, masks: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return sparse ``[B, N+1, C]`` (``[B, 0, C]`` without points) and dense ``[B, C, 8, 8, 8]`` embeddings."""
        return self.sparse_embedding(points, labels, batch_size), self.dense_embedding(masks, batch_size)
