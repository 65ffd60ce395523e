"""Resampling between grids whose axes are parallel (reorientation and spacing changes) as three 1-D passes.

MONAI's ``SpatialResample`` (``Spacingd``, and ``Invertd`` undoing it) runs ``grid_sample`` over every output voxel, in
float64 by default. When each output axis runs along one input axis, trilinear (or nearest) interpolation is a product
of 1-D interpolations, which is several times cheaper on large CTs. :class:`SeparableSpacingd` is ``Spacingd`` with
that resampler and the same recorded trace, so ``Invertd`` and :class:`~msam_components.transforms.PasteWindowd` undo it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd
from monai.transforms.lazy.functional import apply_pending
from monai.utils import LazyAttr, TraceKeys

__all__ = ["SeparableSpacingd", "resample_separable"]

SPATIAL_DIMS = 3
INTERP_MODES = ("bilinear", "nearest")  # modes whose value depends only on the neighbouring voxels (not spline)
AXIS_TOL = 1e-3  # voxels: cross terms that move no sample further than this leave the axes parallel


def _axis_map(
    src_affine: torch.Tensor, dst_affine: torch.Tensor, spatial_size: Sequence[int]
) -> list[tuple[int, float, float]] | None:
    """Per destination axis: (source axis, step, offset) of the voxel mapping, or None when it mixes axes.

    Cross terms count as zero when, over the whole destination grid, they move a sample by less than ``AXIS_TOL``
    voxels (NIfTI stores affines in float32, so the axes of an oblique image are parallel only to about 1e-8).
    """
    xform = torch.linalg.solve(src_affine, dst_affine)  # destination voxel -> source voxel
    linear = xform[:SPATIAL_DIMS, :SPATIAL_DIMS]
    axes = []
    for a in range(SPATIAL_DIMS):
        column = linear[:, a].abs()
        b = int(column.argmax())
        if float(column.sum() - column[b]) * max(int(spatial_size[a]), 1) > AXIS_TOL:
            return None
        axes.append((b, float(linear[b, a]), float(xform[b, SPATIAL_DIMS])))
    return axes if sorted(b for b, _, _ in axes) == list(range(SPATIAL_DIMS)) else None


def _taps(coords: torch.Tensor, n: int, mode: str, padding_mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The source voxels and weights (one pair per neighbour) of 1-D samples at ``coords``, as ``grid_sample``."""
    if padding_mode == "border":
        coords = coords.clamp(0, n - 1)
    if mode == "nearest":
        taps = [(torch.round(coords).to(torch.int64), torch.ones_like(coords))]
    else:
        low = torch.floor(coords)
        taps = [(low.to(torch.int64), 1 - (coords - low)), (low.to(torch.int64) + 1, coords - low)]
    # a neighbour outside the source counts as 0 ("zeros"); with "border" it only occurs with weight 0
    return [(index.clamp(0, n - 1), weight * ((index >= 0) & (index < n))) for index, weight in taps]


def _resample_axis(values: torch.Tensor, dim: int, coords: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Sample ``values`` along ``dim`` at fractional voxel ``coords`` (``grid_sample``'s rules for one axis).

    Along the last (contiguous) axis the samples are one matrix product with the interpolation matrix, which BLAS runs
    far faster than a gather of single elements; along the other axes whole rows are gathered and blended.
    """
    n = values.shape[dim]
    taps = _taps(coords, n, mode, padding_mode)
    if dim == values.ndim - 1:
        matrix = torch.zeros((n, len(coords)), dtype=torch.float64)
        columns = torch.arange(len(coords))
        for index, weight in taps:
            matrix.index_put_((index, columns), weight.to(torch.float64), accumulate=True)
        return values @ matrix.to(values.dtype)
    shape = [1] * values.ndim
    shape[dim] = len(coords)

    def rows(index: torch.Tensor) -> torch.Tensor:
        """Gather along ``dim`` by indexing (``index_select`` on a middle axis is many times slower on CPU)."""
        return values[(slice(None),) * dim + (index,)]

    (i0, w0), *rest = taps
    out = rows(i0)
    if not rest:
        return out if bool((w0 == 1).all()) else out * w0.to(values.dtype).reshape(shape)
    ((i1, w1),) = rest
    if bool((w0 + w1 == 1).all()):  # no neighbour dropped: one fused blend
        return torch.lerp(out, rows(i1), w1.to(values.dtype).reshape(shape))
    return out * w0.to(values.dtype).reshape(shape) + rows(i1) * w1.to(values.dtype).reshape(shape)


def resample_separable(
    values: torch.Tensor,
    src_affine: torch.Tensor,
    dst_affine: torch.Tensor,
    spatial_size: Sequence[int],
    mode: str = "bilinear",
    padding_mode: str = "border",
    align_corners: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """Resample ``[C, *spatial]`` onto ``dst_affine``'s grid one axis at a time; None if the grids are not aligned.

    When each destination axis runs along one source axis (reorientation and spacing changes, also of oblique images)
    trilinear interpolation is a product of 1-D interpolations, so three 1-D passes give ``SpatialResample``'s
    result (same voxel-centre convention for either ``align_corners``, same border and zero padding) at a fraction of
    its cost. Computed in ``dtype``, returned as float32 like ``SpatialResample``.
    """
    del align_corners  # voxel indices are voxel centres either way once MONAI has normalised the affine
    axes = _axis_map(src_affine, dst_affine, spatial_size)
    if axes is None or mode not in INTERP_MODES or padding_mode not in ("border", "zeros"):
        return None
    # bring the source axes into destination order, then shrink first: cheaper passes on the larger grid later
    source_axes = [b for b, _, _ in axes]
    out = torch.as_tensor(values).to(dtype).permute(0, *[b + 1 for b in source_axes])
    order = sorted(range(SPATIAL_DIMS), key=lambda a: spatial_size[a] / out.shape[a + 1])
    for a in order:
        _, step, offset = axes[a]
        coords = torch.arange(int(spatial_size[a]), dtype=torch.float64) * step + offset
        out = _resample_axis(out, a + 1, coords, mode, padding_mode)
    return out.to(torch.float32).contiguous()


class SeparableSpacingd(Spacingd):
    """``Spacingd`` whose resampling runs as :func:`resample_separable` when the grids are aligned (always, unless
    ``diagonal`` or a spline mode is asked for): same voxels up to float32 rounding, same affine, shape and trace.

    MONAI plans the operation lazily (metadata only); the pending operation is then carried out here and recorded as
    applied, exactly as MONAI's own ``apply_pending`` records it. Other cases are left to ``apply_pending``.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        """Resample every key to ``pixdim``; ``lazy=True`` keeps MONAI's lazy behaviour."""
        planned = Spacingd.__call__(self, data, lazy=True)
        if lazy:
            return planned
        d = dict(planned)
        for key in self.key_iterator(d):
            d[key] = _apply_separable(d[key])
        return d


def _apply_separable(img: MetaTensor) -> MetaTensor:
    """Carry out a MetaTensor's one pending resampling with :func:`resample_separable` (else MONAI's ``apply_pending``)."""
    pending = list(img.pending_operations)
    if len(pending) != 1:
        return apply_pending(img, overrides={})[0]
    op = dict(pending[0])
    info = op[TraceKeys.EXTRA_INFO]
    values = resample_separable(
        img.as_tensor(),
        torch.eye(SPATIAL_DIMS + 1, dtype=torch.float64),
        torch.as_tensor(op[LazyAttr.AFFINE], dtype=torch.float64),
        [int(s) for s in op[LazyAttr.SHAPE]],
        mode=info["mode"],
        padding_mode=info["padding_mode"],
        dtype=torch.float32,
    )
    if values is None:
        return apply_pending(img, overrides={})[0]
    affine = img.peek_pending_affine()
    out = MetaTensor(values, meta=dict(img.meta), applied_operations=list(img.applied_operations))
    out.affine = affine
    for lazy_key in (LazyAttr.SHAPE, LazyAttr.AFFINE):  # recorded as an eager Spacingd records it
        op.pop(lazy_key, None)
    op[TraceKeys.LAZY] = False
    out.push_applied_operation(op)
    return out
