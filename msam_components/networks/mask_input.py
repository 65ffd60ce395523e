"""How the MEA receives the mask prompt: one function per compute path, chosen with the attention (``compute_paths``).

The MEA normalises the dense mask embedding (``add_norm2``) and its first block convolves it (``prompt_conv1``, the
costliest per-click layer). The reference path does exactly that on the 384-channel embedding. The fast path keeps the
embedding factored (:class:`FactoredDense`): the mask encoder ends in a 1x1 convolution from 16 channels, and the
LayerNorm only subtracts a per-voxel mean and divides by a per-voxel scale, so the normalised mask is ``A @ [z / s,
1 / s, 1]`` per voxel with a ``[384, 18]`` matrix ``A`` built from the parameters. The 3x3x3 convolution is linear and
zero-padded, so it equals a convolution of those 18 channels with the composed kernel ``conv1.weight @ A``: 12x fewer
multiply-adds, the same result up to float rounding (tested against the plain computation).

Both return a :class:`MaskInput`; the MEA takes it without asking which path made it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FactoredDense",
    "MaskInput",
    "factored_mask_input",
    "factored_mask_kernel",
    "low_rank_mask_conv",
    "mask_conv_kernel",
    "no_mask_kernel",
    "plain_mask_input",
]


class FactoredDense(NamedTuple):
    """A dense prompt embedding kept in factored form: per voxel ``weight @ z + bias``.

    ``z`` ``[B, k, D, H, W]`` is the mask encoder's input to its last (1x1) convolution, and ``weight`` ``[C, k]`` and
    ``bias`` ``[C]`` are that convolution's parameters. ``k`` is 16 against ``C = 384``. ``k = 0`` is the no-mask case,
    a constant field.
    """

    z: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def materialise(self) -> torch.Tensor:
        """The dense embedding ``[B, C, D, H, W]``, computed exactly as the unfactored prompt encoder computes it."""
        if self.z.shape[1] == 0:
            return self.bias.reshape(1, -1, 1, 1, 1).expand(self.z.shape[0], -1, *self.z.shape[2:])
        return F.conv3d(self.z, self.weight[:, :, None, None, None], self.bias)


class MaskInput(NamedTuple):
    """The mask prompt as the MEA takes it: ``mask`` = ``add_norm2(dense)`` ``[B, C, D, H, W]``, and ``conv1`` = the
    first block's ``prompt_conv1(mask)`` where the path computed it (None: the block convolves ``mask`` itself)."""

    mask: torch.Tensor
    conv1: torch.Tensor | None = None


class MaskPrompts(Protocol):
    """What the path functions use of the prompt encoder (:class:`PromptEncoder3D`)."""

    def dense_embedding(self, masks: torch.Tensor | None, batch_size: int) -> torch.Tensor: ...

    def factored_dense_embedding(self, masks: torch.Tensor | None, batch_size: int) -> FactoredDense: ...

    def factored_mask_parameters(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class MaskBranch(Protocol):
    """What the path functions use of the MEA (:class:`MaskEnhancedAdapter`): its mask norm and first mask conv."""

    add_norm2: nn.Module

    @property
    def mask_conv(self) -> nn.Conv3d: ...


def plain_mask_input(
    mea: MaskBranch, prompts: MaskPrompts, masks: torch.Tensor | None, batch: int, kernel: torch.Tensor | None = None
) -> MaskInput:
    """Reference: the dense embedding, normalised; the MEA's block convolves all 384 channels."""
    return MaskInput(mea.add_norm2(prompts.dense_embedding(masks, batch)))


def factored_mask_input(
    mea: MaskBranch, prompts: MaskPrompts, masks: torch.Tensor | None, batch: int, kernel: torch.Tensor | None = None
) -> MaskInput:
    """Fast: the normalised mask and its first convolution computed on the factored embedding's ``k + 2`` channels.

    ``kernel`` may pass :func:`factored_mask_kernel` (it depends on parameters only, so callers compute it per image).
    """
    factored = prompts.factored_dense_embedding(masks, batch)
    mask, std = mea.add_norm2.forward_with_std(factored.materialise())
    if kernel is None:
        kernel = mask_conv_kernel(mea.mask_conv, mea.add_norm2, factored.weight, factored.bias)
    return MaskInput(mask, low_rank_mask_conv(mea.mask_conv, kernel, factored.z, std))


def no_mask_kernel(mea: MaskBranch, prompts: MaskPrompts) -> None:
    """Reference: nothing to prepare per image."""
    return None


def factored_mask_kernel(mea: MaskBranch, prompts: MaskPrompts) -> torch.Tensor:
    """Fast: the composed mask-branch kernel for a mask prompt (computed once per image, in step with training)."""
    weight, bias = prompts.factored_mask_parameters()
    return mask_conv_kernel(mea.mask_conv, mea.add_norm2, weight, bias)


def mask_conv_kernel(conv: nn.Conv3d, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``conv.weight`` composed with ``A = [g * (W - mean_c W), g * (b - mean b), beta]``: ``[C_out, k + 2, ...]``.

    ``norm(W z + b)`` equals ``A @ [z / std, 1 / std, 1]`` per voxel (``std`` the scale ``norm`` divides by), so
    ``conv`` of it equals a convolution of those ``k + 2`` channels with this kernel.
    """
    gain = norm.weight[:, None]
    mix = torch.cat([gain * (weight - weight.mean(0)), gain * (bias - bias.mean())[:, None], norm.bias[:, None]], 1)
    out_ch, in_ch = conv.weight.shape[:2]
    # [C_out, C_in, 27] x [C_in, k + 2] as one batched matmul over C_out: no copy of the large kernel
    kernel = mix.t() @ conv.weight.reshape(out_ch, in_ch, -1)
    return kernel.reshape(out_ch, mix.shape[1], *conv.weight.shape[2:])


def low_rank_mask_conv(conv: nn.Conv3d, kernel: torch.Tensor, z: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``conv(norm(W z + b))`` computed on ``k + 2`` channels ``[z / std, 1 / std, 1]`` instead of ``C``.

    ``kernel`` is :func:`mask_conv_kernel` for ``W``, ``b`` and ``norm``; ``std`` the per-voxel scale ``norm`` divided
    by (``LayerNorm3d.forward_with_std``). Exact in real arithmetic; zero padding commutes since ``A`` is linear.
    """
    inv = std.reciprocal()
    channels = torch.cat([z * inv, inv, torch.ones_like(inv)], 1)
    return F.conv3d(channels, kernel, conv.bias, conv.stride, conv.padding, conv.dilation)
