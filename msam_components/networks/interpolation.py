"""Trilinear resizing as three 1-D interpolation matmuls: the same numbers as ``F.interpolate``, a cheap backward.

Trilinear interpolation (``align_corners=False``) is separable: each axis is a fixed ``[out, in]`` matrix with at most
two non-zero weights per row. Applying the three matrices one axis at a time costs about as much as writing the output,
and its backward is three transposed matmuls, where PyTorch's CPU ``upsample_trilinear3d_backward`` scatters voxel by
voxel (about 40 ms for one 32^3 to 128^3 map on 2 cores, against a few ms here).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def linear_interpolation_matrix(
    in_size: int, out_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[out_size, in_size]`` weights of 1-D linear interpolation with ``align_corners=False``, as ``F.interpolate``.

    Source coordinate ``(i + 0.5) * in / out - 0.5``, clamped at 0; the upper neighbour is clamped to the last sample.
    """
    dst = torch.arange(out_size, dtype=torch.float64)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    lower = src.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    frac = src - lower
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, lower), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, upper), frac, accumulate=True)
    return weights.to(dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _cached_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`linear_interpolation_matrix` built once per size, dtype and device.

    Building it per call costs host work and a host-to-device copy, which waits for the GPU, on every click. Built as
    a normal tensor even under ``inference_mode``, so a later training step can use it.
    """
    with torch.inference_mode(False):
        return linear_interpolation_matrix(in_size, out_size, dtype, device)


def separable_trilinear(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="trilinear", align_corners=False)`` for ``[B, C, D, H, W]`` via three matmuls.

    Runs in ``x``'s dtype with autocast off (like the interpolation it replaces, which keeps its input dtype).
    """
    b, c, d, h, w = x.shape
    out_d, out_h, out_w = size
    with torch.autocast(x.device.type, enabled=False):
        mats = [_cached_matrix(n, m, x.dtype, x.device) for n, m in ((d, out_d), (h, out_h), (w, out_w))]
        y = x.reshape(b * c * d * h, w) @ mats[2].t()  # W axis on the smallest tensor first
        y = mats[1] @ y.view(b * c * d, h, out_w)  # H axis
        y = mats[0] @ y.view(b * c, d, out_h * out_w)  # D axis
    return y.view(b, c, out_d, out_h, out_w)


def trilinear(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """The reference: ``F.interpolate`` trilinear with ``align_corners=False`` (what :func:`separable_trilinear` equals)."""
    return torch.nn.functional.interpolate(x, size=size, mode="trilinear", align_corners=False)
