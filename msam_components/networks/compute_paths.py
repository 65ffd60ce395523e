"""The one seam between the reference and the fast computations: a :class:`ComputePath` holds one function per
operation whose fast form could drift, and a model picks its path once (``attention_impl``).

Modules that run such an operation hold the path (:class:`UsesComputePath`) and call it, so the encoder, decoder and
model each read as one code path. ``REFERENCE`` is the straightforward computation; ``FAST`` gives the same numbers
(tested against it and against the upstream fixtures) and is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .decoder_masks import fused_masks, plain_masks
from .fast_attention import fast_windowed_attention, global_attention
from .interpolation import separable_trilinear, trilinear
from .mask_input import MaskInput, factored_mask_input, factored_mask_kernel, no_mask_kernel, plain_mask_input
from .reference_attention import dense_attention, windowed_attention


@dataclass(frozen=True)
class ComputePath:
    """One implementation of each path-dependent operation.

    Attributes:
        name: the ``attention_impl`` value that selects it.
        attention: ``(attn, x [B, D, H, W, C]) -> [B, D, H, W, C]``, self-attention over all tokens.
        windowed_attention: ``(attn, x, window_size) -> x``, attention within SAM's zero-padded windows.
        decoder_masks: ``(decoder, hs, src, grid, sel) -> masks``, the decoder's tokens-to-masks step.
        upsample: ``(low_res [B, C, d, h, w], size) -> [B, C, *size]``, trilinear with ``align_corners=False``.
        mea_mask_input: ``(mea, prompt_encoder, low_res_mask | None, batch, kernel) -> MaskInput``, the mask prompt as
            the MEA takes it (``mask_input.py``): plain, or factored on 16 channels instead of 384.
        mea_mask_kernel: ``(mea, prompt_encoder) -> kernel | None``, what ``mea_mask_input`` can reuse per image.
    """

    name: str
    attention: Callable[..., torch.Tensor]
    windowed_attention: Callable[..., torch.Tensor]
    decoder_masks: Callable[..., torch.Tensor]
    upsample: Callable[[torch.Tensor, tuple[int, int, int]], torch.Tensor]
    mea_mask_input: Callable[..., MaskInput]
    mea_mask_kernel: Callable[..., torch.Tensor | None]

    def __repr__(self) -> str:
        return f"ComputePath({self.name!r})"


REFERENCE = ComputePath(
    "reference", dense_attention, windowed_attention, plain_masks, trilinear, plain_mask_input, no_mask_kernel
)
FAST = ComputePath(
    "fast",
    global_attention,
    fast_windowed_attention,
    fused_masks,
    separable_trilinear,
    factored_mask_input,
    factored_mask_kernel,
)
PATHS = {path.name: path for path in (REFERENCE, FAST)}
ATTENTION_IMPLS = tuple(PATHS)


def compute_path(attention_impl: str | ComputePath) -> ComputePath:
    """The path an ``attention_impl`` names (``"reference"`` or ``"fast"``); a clear error for anything else."""
    if isinstance(attention_impl, ComputePath):
        return attention_impl
    if attention_impl not in PATHS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    return PATHS[attention_impl]


class UsesComputePath:
    """Mixin for a module that runs a path-dependent operation: it holds ``path`` (``FAST`` until
    :func:`set_attention_impl` switches it); ``attention_impl`` is its name."""

    path: ComputePath = FAST

    @property
    def attention_impl(self) -> str:
        return self.path.name


def set_attention_impl(module: nn.Module, attention_impl: str) -> None:
    """Switch ``module`` and every submodule that holds a compute path to ``attention_impl`` (no parameter changes)."""
    path = compute_path(attention_impl)
    for sub in module.modules():
        if isinstance(sub, UsesComputePath):
            sub.path = path


__all__ = [
    "ATTENTION_IMPLS",
    "FAST",
    "REFERENCE",
    "ComputePath",
    "UsesComputePath",
    "compute_path",
    "set_attention_impl",
]
