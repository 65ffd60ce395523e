"""The mask decoder's last step, tokens to masks: the plain layers (reference) or a fused, selected-masks-only form.

Both take the decoder (for its layers), its transformer's output tokens ``hs`` ``[B, T+1+P, C]`` and image tokens
``src`` ``[B, N, C]`` in raster order of ``grid``, and ``sel`` (which masks to return); both return the same masks.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class MaskHead(Protocol):
    """What the tokens-to-masks step reads of the decoder (:class:`mask_decoder.MaskDecoder3D`)."""

    transformer_dim: int
    output_upscaling: nn.Sequential
    output_hypernetworks_mlps: nn.ModuleList


def hypernetwork_weights(decoder: MaskHead, hs: torch.Tensor) -> torch.Tensor:
    """``[B, T, C / 8]``: every mask token through its own hypernetwork MLP (all of them, so unused ones get zero
    gradients as in the reference)."""
    return torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)


def plain_masks(
    decoder: MaskHead, hs: torch.Tensor, src: torch.Tensor, grid: tuple[int, int, int], sel: slice
) -> torch.Tensor:
    """All masks ``hyper_in @ output_upscaling(src)`` with the plain layers, then the selected ones."""
    b = src.shape[0]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, decoder.transformer_dim, *grid))
    c, spatial = upscaled.shape[1], upscaled.shape[2:]
    masks = (hypernetwork_weights(decoder, hs) @ upscaled.reshape(b, c, -1)).reshape(b, -1, *spatial)
    return masks[:, sel]


def fused_masks(
    decoder: MaskHead, hs: torch.Tensor, src: torch.Tensor, grid: tuple[int, int, int], sel: slice
) -> torch.Tensor:
    """The selected masks only, computed channels-last with each transposed conv as one matmul.

    A kernel-2, stride-2 transposed conv maps each voxel to its own 2x2x2 block, i.e. a matmul to ``8 * C_out``
    channels ordered (offset, channel); rows stay grouped by (voxel, offset, offset), and one permutation at the end
    puts the ``T`` masks in place.
    """
    hyper_in = hypernetwork_weights(decoder, hs)[:, sel]
    b, t = hyper_in.shape[:2]
    up1, norm, act1, up2, act2 = decoder.output_upscaling
    x = act1(F.layer_norm(_as_matmul(up1, src), (up1.out_channels,), norm.weight, norm.bias, norm.eps))
    x = act2(_as_matmul(up2, x.reshape(b, -1, up1.out_channels)))
    masks = x.reshape(b, -1, up2.out_channels) @ hyper_in.transpose(1, 2)  # [B, N * 8 * 8, T]
    d, h, w = grid
    masks = masks.view(b, d, h, w, 2, 2, 2, 2, 2, 2, t).permute(0, 10, 1, 4, 7, 2, 5, 8, 3, 6, 9)
    return masks.reshape(b, t, 4 * d, 4 * h, 4 * w)


def _as_matmul(conv: nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-2, stride-2 ``ConvTranspose3d`` on channels-last rows ``[B, N, C_in]``: ``[B, N, 8, C_out]``."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.flatten(2).transpose(1, 2).reshape(c_in, 8 * c_out)  # (offset, channel) columns
    return (x @ weight + conv.bias.repeat(8)).view(*x.shape[:2], 8, c_out)
