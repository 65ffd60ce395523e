"""Paste a window prediction back into the input image's voxel grid, resampling only the window's bounding box.

Inference preprocesses the whole image (reorientation, resampling to ``pixdim``) and crops a 128^3 window around the
clicks. ``monai.transforms.Invertd`` maps the window's prediction back by padding it to the whole resampled volume and
resampling all of it, which costs seconds on a 512x512x134 CT although everything outside the window is zero.
:class:`PasteWindowd` resamples only the bounding box of the window (plus a zero margin) in the input grid, as three
1-D passes where the grids are aligned (:func:`~msam_components.transforms.resample.resample_separable`), and pastes it
into an all-zero volume of the input's shape and affine; ``full_inversion=True`` keeps the plain ``Invertd`` path as
the reference it is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import AsDiscreted, Invertd, MapTransform, SpatialResample, Transform
from monai.utils import TraceKeys, ensure_tuple_rep

from ..checks import as_bool
from .resample import INTERP_MODES, resample_separable

__all__ = [
    "PasteWindowd",
    "WindowGeometry",
    "mask_volume",
    "paste_window",
    "window_box",
    "window_geometry",
    "zero_preserving",
]

SPATIAL_DIMS = 3
RESAMPLE_OPS = ("SpatialResample", "Spacing")  # Spacing records itself as SpatialResample; both keep world positions
REORIENT_OPS = ("Orientation",)  # exact axis permutations and flips, also world-preserving
BOX_KEY = "pasted_box"  # meta of a box_only result: its start and the input shape, for mask_volume


@dataclass(frozen=True)
class WindowGeometry:
    """How a preprocessed window sits in the resampled image, and how that image maps back onto the input grid.

    ``valid`` is the part of the window inside the resampled image (the rest is crop-or-pad padding), ``crop_start``
    where that part begins in the resampled image of shape ``resampled_shape``; ``resample`` holds the keyword
    arguments of the recorded resampling (mode, padding mode, corner alignment, dtype), as its inverse would use them.
    """

    window_affine: torch.Tensor
    valid: tuple[slice, ...]
    crop_start: tuple[int, ...]
    resampled_shape: tuple[int, ...]
    input_affine: torch.Tensor
    input_shape: tuple[int, ...]
    resample: dict[str, Any]

    @property
    def resampled_affine(self) -> torch.Tensor:
        """Affine of the whole resampled image (the window's affine shifted back by the window's start)."""
        start = [v.start - c for v, c in zip(self.valid, self.crop_start)]
        return self.window_affine @ _translation(start)


def _translation(shift: Sequence[float]) -> torch.Tensor:
    """A 4x4 float64 affine that maps voxel ``x`` to ``x + shift``."""
    affine = torch.eye(SPATIAL_DIMS + 1, dtype=torch.float64)
    affine[:SPATIAL_DIMS, SPATIAL_DIMS] = torch.as_tensor([float(s) for s in shift], dtype=torch.float64)
    return affine


def _affine(value: object) -> torch.Tensor:
    """A 4x4 float64 tensor from a tensor or array affine."""
    return torch.as_tensor(value).detach().cpu().to(torch.float64).reshape(SPATIAL_DIMS + 1, SPATIAL_DIMS + 1).clone()


def window_geometry(
    image: MetaTensor, nearest_interp: bool = False, dtype: torch.dtype | None = None
) -> WindowGeometry | None:
    """Read a window's geometry from its trace; None unless it is reorient / one resample / crop / pad.

    ``dtype`` overrides the recorded computation dtype (Spacingd's default float64; float32 is twice as fast).

    Only for that chain is one direct resampling of the window onto the input grid the same as ``Invertd`` undoing
    each step (reorientations are exact, so the single resampling is the only interpolation); anything else (two
    resamplings, a spline mode, a flip) is left to the full inversion.
    """
    if not isinstance(image, MetaTensor) or "original_affine" not in image.meta or "spatial_shape" not in image.meta:
        return None
    ops = list(image.applied_operations)
    if len(ops) < 3 or [op[TraceKeys.CLASS_NAME] for op in ops[-2:]] != ["Crop", "Pad"]:
        return None
    crop, pad = ops[-2][TraceKeys.EXTRA_INFO], ops[-1][TraceKeys.EXTRA_INFO]
    resamples = [op for op in ops[:-2] if op[TraceKeys.CLASS_NAME] in RESAMPLE_OPS]
    if len(resamples) != 1 or any(op[TraceKeys.CLASS_NAME] not in RESAMPLE_OPS + REORIENT_OPS for op in ops[:-2]):
        return None
    info = resamples[0][TraceKeys.EXTRA_INFO]
    mode = "nearest" if nearest_interp else info["mode"]
    if mode not in INTERP_MODES or len(image.shape) != SPATIAL_DIMS + 1:
        return None
    align_corners = info.get("align_corners")
    window_shape = tuple(int(s) for s in image.shape[1:])
    pad_before = [int(p[0]) for p in pad["padded"][1:]]
    pad_after = [int(p[1]) for p in pad["padded"][1:]]
    cropped = [int(c) for c in crop["cropped"]]
    return WindowGeometry(
        window_affine=_affine(image.affine),
        valid=tuple(slice(b, s - a) for b, a, s in zip(pad_before, pad_after, window_shape)),
        crop_start=tuple(cropped[0::2]),
        resampled_shape=tuple(int(s) for s in ops[-2][TraceKeys.ORIG_SIZE]),
        input_affine=_affine(image.meta["original_affine"]),
        input_shape=tuple(int(s) for s in image.meta["spatial_shape"][:SPATIAL_DIMS]),
        resample={
            "mode": mode,
            "padding_mode": info["padding_mode"],
            "align_corners": align_corners if isinstance(align_corners, bool) else False,
            "dtype": dtype or getattr(torch, str(info.get("dtype", "float32"))),
        },
    )


def _input_box(geometry: WindowGeometry, start: Sequence[int], end: Sequence[int]) -> tuple[list[int], list[int]]:
    """Bounding box (start, end) in the input grid of the resampled-grid box ``[start, end)``, one voxel wider.

    A side that touches the resampled image's border is pushed far out: there the inversion's border padding may carry
    values a little beyond the resampled grid, up to the input's own border.
    """
    far = max(geometry.resampled_shape) + 1
    lo = [s - 1 - (far if s == 0 else 0) for s in start]
    hi = [e + (far if e == n else 0) for e, n in zip(end, geometry.resampled_shape)]
    to_input = torch.linalg.solve(geometry.input_affine, geometry.resampled_affine)
    corners = torch.tensor([[*c, 1.0] for c in product(*zip(lo, hi))], dtype=torch.float64)
    points = (corners @ to_input.T)[:, :SPATIAL_DIMS]
    box_start = [max(math.floor(v) - 1, 0) for v in points.min(dim=0).values.tolist()]
    box_end = [min(math.ceil(v) + 2, n) for v, n in zip(points.max(dim=0).values.tolist(), geometry.input_shape)]
    return box_start, box_end


def window_box(pred: torch.Tensor, geometry: WindowGeometry, margin: int = 2) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Resample a channel-first window prediction onto its bounding box in the input grid: (float32 values, start).

    The window's valid part is put in a box of the resampled grid with ``margin`` voxels of zeros around it (what the
    full inversion sees there), and that box alone is resampled; the input is zero outside the returned box.
    """
    if margin < 1:
        raise ValueError(f"margin must be >= 1 voxel (the interpolation reaches one voxel out), got {margin}")
    values = torch.as_tensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred).detach().cpu()
    crop_start = list(geometry.crop_start)
    crop_end = [c + v.stop - v.start for c, v in zip(crop_start, geometry.valid)]
    start = [max(c - margin, 0) for c in crop_start]
    end = [min(e + margin, n) for e, n in zip(crop_end, geometry.resampled_shape)]
    box_start, box_end = _input_box(geometry, start, end)
    if any(e <= s for s, e in zip(box_start, box_end)) or any(e <= s for s, e in zip(crop_start, crop_end)):
        return torch.zeros((values.shape[0], 0, 0, 0), dtype=torch.float32), (0, 0, 0)
    region = torch.zeros((values.shape[0], *[e - s for s, e in zip(start, end)]), dtype=values.dtype)
    inner = tuple(slice(c - s, e - s) for c, e, s in zip(crop_start, crop_end, start))
    region[(slice(None), *inner)] = values[(slice(None), *geometry.valid)]
    src_affine = geometry.resampled_affine @ _translation(start)
    dst_affine = geometry.input_affine @ _translation(box_start)
    size = [e - s for s, e in zip(box_start, box_end)]
    resampled = resample_separable(region, src_affine, dst_affine, size, **geometry.resample)
    if resampled is None:  # an oblique mapping between the grids: MONAI's general resampling
        resampled = SpatialResample(**geometry.resample)(
            MetaTensor(region, affine=src_affine), dst_affine=dst_affine, spatial_size=size
        )
        resampled = resampled.as_tensor() if isinstance(resampled, MetaTensor) else resampled
    return resampled.to(torch.float32), tuple(box_start)


def paste_window(pred: torch.Tensor, geometry: WindowGeometry, margin: int = 2) -> torch.Tensor:
    """Map a channel-first window prediction onto the input grid: ``[C, *input_shape]`` float32, zero off its box."""
    box, start = window_box(pred, geometry, margin)
    out = torch.zeros((box.shape[0], *geometry.input_shape), dtype=torch.float32)
    out[(slice(None), *(slice(s, s + n) for s, n in zip(start, box.shape[1:])))] = box
    return out


def zero_preserving(transforms: Sequence[Callable]) -> bool:
    """Whether postprocessing after a ``box_only`` paste keeps the zeros around the box zero, so it can run on the box.

    True when every ``AsDiscreted`` only thresholds at a positive level (no argmax, one-hot or rounding) and every other
    transform is one of this package's (read-only checks such as ``WarnEmptyMaskd``); anything else may turn 0 into 1.
    """
    for t in transforms:
        if isinstance(t, AsDiscreted):
            thresholds_only = not any(t.argmax) and not any(t.to_onehot) and all(r is None for r in t.rounding)
            if not thresholds_only or not all(v is not None and v > 0 for v in t.threshold):
                return False
        elif not type(t).__module__.startswith("msam_components."):
            return False
    return True


def mask_volume(pred: torch.Tensor) -> np.ndarray:
    """The uint8 mask ``pred > 0`` (first channel) on the whole input grid, Fortran-ordered for a fast NIfTI write.

    A :class:`PasteWindowd` ``box_only`` result is pasted into zeros of the input's shape; anything else is taken whole.
    """
    box = pred.meta.get(BOX_KEY) if isinstance(pred, MetaTensor) else None
    values = (torch.as_tensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred)[0] > 0).cpu().numpy()
    if box is None:
        return np.asfortranarray(values, dtype=np.uint8)
    out = np.zeros(tuple(box["input_shape"]), dtype=np.uint8, order="F")
    out[tuple(slice(s, s + n) for s, n in zip(box["start"], values.shape))] = values
    return out


class PasteWindowd(MapTransform):
    """Invert inference preprocessing on a window prediction fast: resample only the window's box, paste into zeros.

    Drop-in for ``Invertd(keys, transform, orig_keys, nearest_interp, to_tensor)`` after a reorient / resample /
    :class:`~msam_components.transforms.CropOrPadAroundClicksd` chain: each key becomes a MetaTensor of the input's
    shape and affine (``orig_keys``' ``original_affine``, ``spatial_shape``), equal to ``Invertd``'s result except for
    resampling rounding. Other chains, and ``full_inversion=True`` (the reference), run ``Invertd`` itself.
    ``box_only=True`` returns just the bounding box (its own affine; start and input shape in ``meta["pasted_box"]``)
    for a caller that thresholds the box and pastes it with :func:`mask_volume`, so no full-size float volume is made:
    the transforms in between must map 0 to 0 voxel by voxel (thresholding at a positive level does).
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform: Transform,
        orig_keys: KeysCollection = "image",
        nearest_interp: bool = False,
        to_tensor: bool = True,
        full_inversion: bool = False,
        box_only: bool = False,
        dtype: torch.dtype | None = torch.float32,
        margin: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        """Configure like ``Invertd``; ``full_inversion`` selects the plain whole-volume path, ``dtype`` the computation
        dtype of the fast path (None: the recorded one, as ``Invertd``), ``margin`` the zero rim in resampled voxels."""
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.orig_keys = ensure_tuple_rep(orig_keys, len(self.keys))
        self.nearest_interp = as_bool(nearest_interp, "nearest_interp")
        self.full_inversion = as_bool(full_inversion, "full_inversion")  # "false" from a command line is False
        self.box_only = as_bool(box_only, "box_only")
        self.dtype = dtype
        self.margin = int(margin)
        self.reference = Invertd(
            keys=keys,
            transform=transform,
            orig_keys=orig_keys,
            nearest_interp=self.nearest_interp,
            to_tensor=to_tensor,
            allow_missing_keys=allow_missing_keys,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a shallow copy of ``data`` with every key mapped back onto its original image's voxel grid."""
        d = dict(data)
        pairs = list(self.key_iterator(d, self.orig_keys))
        geometries = [window_geometry(d.get(orig), self.nearest_interp, self.dtype) for _, orig in pairs]
        if self.full_inversion or any(g is None for g in geometries):
            return self.reference(d)
        for (key, orig), geometry in zip(pairs, geometries):
            meta = {k: v for k, v in d[orig].meta.items() if k != "affine"}
            if self.box_only:
                box, start = window_box(d[key], geometry, self.margin)
                meta[BOX_KEY] = {"start": start, "input_shape": geometry.input_shape}
                d[key] = MetaTensor(box, affine=geometry.input_affine @ _translation(start), meta=meta)
            else:
                d[key] = MetaTensor(
                    paste_window(d[key], geometry, self.margin), affine=geometry.input_affine, meta=meta
                )
        return d
