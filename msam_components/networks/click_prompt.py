"""Clicks written into the mask prompt: an optional, parameter-free prompt encoding that makes clicks hard to ignore.

M-SAM gives a click to the decoder only as a sparse point token, while the previous mask enters through the MEA at
every voxel; a model trained from scratch can then copy its mask and ignore the click. With ``click_stamp > 0`` each
click is also written into the low-resolution mask prompt as a Gaussian bump (``+click_stamp`` for a positive click,
``-click_stamp`` for a negative one, ``sigma`` in low-res voxels) that replaces the prompt where it is large, so the
MEA sees the click at full spatial precision, next to the mask it corrects. ``click_stamp = 0`` is the upstream model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mask_prompt", "stamp_clicks"]


def mask_prompt(mask: torch.Tensor, size: tuple[int, ...], scale: float | torch.Tensor = 4.0) -> torch.Tensor:
    """A binary mask ``[B, 1, D, H, W]`` as low-res mask-prompt logits ``[B, 1, *size]``: the share of each low-res
    voxel the mask covers, mapped linearly to ``[-scale, +scale]`` (``scale``: a number or one per sample).

    This is how a given mask (an existing segmentation to edit, or a training recipe's imperfect starting mask) enters
    the model in place of the previous click's logits."""
    low = F.adaptive_avg_pool3d(mask.float(), tuple(size))
    scale = torch.as_tensor(scale, dtype=low.dtype, device=low.device).reshape(-1, 1, 1, 1, 1)
    return (2.0 * low - 1.0) * scale


def stamp_clicks(
    low_res_mask: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    image_size: int,
    strength: float,
    sigma: float,
) -> torch.Tensor:
    """Write clicks into low-res logits ``[B, 1, d, h, w]``: ``prompt * (1 - g) + strength * (g_pos - g_neg)``.

    ``points`` ``[B, N, 3]`` are voxel indices ``(d, h, w)`` of the ``image_size``^3 input, ``labels`` ``[B, N]``
    (1 positive, 0 negative, -1 padding: ignored). ``g_pos``/``g_neg`` are the largest Gaussian weights of the positive
    and negative clicks at each low-res voxel, ``g = max(g_pos, g_neg)``. Dense tensor maths only (no host sync).
    """
    size = low_res_mask.shape[2:]
    dtype, device = low_res_mask.dtype, low_res_mask.device
    centres = [
        (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (image_size / n) - 0.5 for n in size
    ]  # low-res voxel centres in input voxel coordinates
    pts = points.to(torch.float32)
    dist2 = sum(
        (
            (
                c.view(*([1, 1] + [-1 if a == axis else 1 for a in range(3)]))
                - pts[..., axis].view(*pts.shape[:2], 1, 1, 1)
            )
            / (image_size / size[axis])  # a Python scalar: no tensor from host data (CUDA graphs)
        )
        ** 2
        for axis, c in enumerate(centres)
    )  # [B, N, d, h, w] squared distance in low-res voxels
    weight = torch.exp(-dist2 / (2.0 * sigma**2))
    positive = (labels == 1).to(torch.float32).view(*labels.shape, 1, 1, 1)
    negative = (labels == 0).to(torch.float32).view(*labels.shape, 1, 1, 1)
    g_pos = (weight * positive).amax(dim=1, keepdim=True).to(dtype)
    g_neg = (weight * negative).amax(dim=1, keepdim=True).to(dtype)
    g = torch.maximum(g_pos, g_neg)
    return low_res_mask * (1 - g) + strength * (g_pos - g_neg)
