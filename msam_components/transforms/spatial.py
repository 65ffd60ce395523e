"""Spatial MONAI dictionary transforms for M-SAM: fixed-size crop-or-pad windows and click mapping to the image grid.

The network always sees a ``spatial_size`` (128^3) window. Training crops it around the lesion
(:class:`CropOrPadAroundLabeld`); inference maps user clicks from the on-disk voxel grid to the preprocessed grid
(:class:`MapClicksToImaged`) and crops around them (:class:`CropOrPadAroundClicksd`). Both crops are invertible with
``monai.transforms.Invertd`` so a prediction can be pasted back into the original image geometry.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Crop, InvertibleTransform, MapTransform, Pad, Randomizable
from monai.utils import ensure_tuple_rep

__all__ = [
    "box_from_extent",
    "group_clicks",
    "CropOrPadAroundClicksd",
    "CropOrPadAroundLabeld",
    "CropPadBox",
    "MapClicksToImaged",
    "compute_crop_or_pad_box",
    "foreground_bbox_center",
    "parse_clicks",
]

SPATIAL_DIMS = 3
ON_DISK_KEY = "clicks_on_disk"  # MapClicksToImaged -> CropOrPadAroundClicksd: the clicks as the user gave them
CENTER_MODES = ("first", "foreground", "all")


@dataclass(frozen=True)
class CropPadBox:
    """A fixed-size window placed on an image grid: the region cropped from the image and the padding around it.

    ``window_start`` is where the window begins in the input grid (negative when padding is added before); a voxel
    ``x`` of the input lands at ``x - window_start`` in the output, which equals ``x - crop_start + pad_before``.
    """

    window_start: tuple[int, ...]
    crop_start: tuple[int, ...]
    crop_end: tuple[int, ...]
    pad_before: tuple[int, ...]
    pad_after: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        """Spatial slices of the cropped region (no channel entry), as ``monai.transforms.Crop`` expects."""
        return tuple(slice(s, e) for s, e in zip(self.crop_start, self.crop_end))

    @property
    def to_pad(self) -> list[tuple[int, int]]:
        """Padding per dimension including a leading ``(0, 0)`` for the channel, as ``monai.transforms.Pad`` expects."""
        return [(0, 0)] + list(zip(self.pad_before, self.pad_after))

    def to_window(self, points: torch.Tensor) -> torch.Tensor:
        """Shift ``[N, D]`` voxel indices from the input grid into the window's grid."""
        return points - torch.as_tensor(self.window_start, dtype=points.dtype, device=points.device)


def compute_crop_or_pad_box(
    spatial_shape: Sequence[int], center: Sequence[float], roi_size: Sequence[int]
) -> CropPadBox:
    """Place a ``roi_size`` window centred on ``center`` (voxel coords), shifted to stay within the image where possible.

    Per axis the window centre ``(roi - 1) / 2`` is aligned with ``center`` (rounded to the voxel grid). When the image
    is at least ``roi`` long the window is moved inside the image (pure crop); otherwise it is moved so the whole
    image lies inside it (pure padding). The window is therefore never partly outside on one side and cropping on the
    other, so a region that fits in ``roi`` and is centred near ``center`` is kept whole.
    """
    if not len(spatial_shape) == len(center) == len(roi_size):
        raise ValueError(
            f"spatial_shape {tuple(spatial_shape)}, center {tuple(center)} and roi_size {tuple(roi_size)} "
            "must have the same length"
        )
    window_start = []
    for size, c, roi in zip(spatial_shape, center, roi_size):
        size, roi = int(size), int(roi)
        if roi <= 0 or size <= 0:
            raise ValueError(f"roi_size {tuple(roi_size)} and spatial_shape {tuple(spatial_shape)} must be positive")
        if not math.isfinite(float(c)):
            raise ValueError(f"center {tuple(center)} must be finite")
        start = math.floor(float(c) - roi / 2 + 0.5)
        window_start.append(min(max(start, min(0, size - roi)), max(0, size - roi)))
    return box_from_extent(spatial_shape, window_start, roi_size)


def box_from_extent(spatial_shape: Sequence[int], start: Sequence[int], size: Sequence[int]) -> CropPadBox:
    """The box of ``size`` voxels beginning at ``start`` (may lie partly outside the image: that part is padding)."""
    crop_start = [max(int(a), 0) for a in start]
    crop_end = [min(int(a) + int(n), int(s)) for a, n, s in zip(start, size, spatial_shape)]
    return CropPadBox(
        tuple(int(a) for a in start),
        tuple(crop_start),
        tuple(crop_end),
        tuple(c - int(a) for c, a in zip(crop_start, start)),
        tuple(int(a) + int(n) - e for a, n, e in zip(start, size, crop_end)),
    )


def group_clicks(points: torch.Tensor, roi_size: Sequence[int], margin: Sequence[int]) -> torch.Tensor:
    """Group ``[N, 3]`` clicks, in order, so that each group spans at most ``roi - 2 * margin`` voxels per axis (one
    model window with context around it); a click joins the first group it fits. Returns the group of each click."""
    limit = torch.tensor([int(r) - 2 * int(m) - 1 for r, m in zip(roi_size, margin)], dtype=torch.int64)
    if (limit < 0).any():
        raise ValueError(f"margin {tuple(margin)} leaves no room in the window {tuple(roi_size)}")
    lows: list[torch.Tensor] = []
    highs: list[torch.Tensor] = []
    groups = []
    for point in points.to(torch.int64):
        for g, (lo, hi) in enumerate(zip(lows, highs)):
            if bool((torch.maximum(hi, point) - torch.minimum(lo, point) <= limit).all()):
                lows[g], highs[g] = torch.minimum(lo, point), torch.maximum(hi, point)
                groups.append(g)
                break
        else:
            lows.append(point.clone())
            highs.append(point.clone())
            groups.append(len(lows) - 1)
    return torch.tensor(groups, dtype=torch.int64)


def _spatial_size_tuple(spatial_size: int | Sequence[int]) -> tuple[int, ...]:
    """Normalise an int or per-axis sequence to a tuple of ``SPATIAL_DIMS`` positive ints."""
    size = tuple(int(s) for s in ensure_tuple_rep(spatial_size, SPATIAL_DIMS))
    if any(s <= 0 for s in size):
        raise ValueError(f"spatial_size must be positive, got {spatial_size!r}")
    return size


def _spatial_shape(img: object) -> tuple[int, ...]:
    """Spatial shape of a channel-first array or tensor."""
    return tuple(int(s) for s in np.shape(img)[1:])


class _CropOrPadd(MapTransform, InvertibleTransform):
    """Shared machinery: apply one :class:`CropPadBox` to all keys with persistent Crop/Pad instances, and undo it."""

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: int | Sequence[int],
        mode: str | Sequence[str],
        allow_missing_keys: bool,
    ) -> None:
        """Store the window size and per-key pad modes; one Crop and one Pad instance so inverse ID checks match."""
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.spatial_size = _spatial_size_tuple(spatial_size)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self._cropper = Crop()
        self._padder = Pad()

    def _common_shape(self, d: Mapping[Hashable, object], reference: Hashable | None = None) -> tuple[int, ...]:
        """Spatial shape shared by all present keys (and ``reference``); raise naming the key that differs."""
        names = ([reference] if reference is not None else []) + list(self.key_iterator(d))
        if not names:
            raise KeyError(f"none of the keys {self.keys} is in the data")
        shape = _spatial_shape(d[names[0]])
        if len(shape) != SPATIAL_DIMS:
            raise ValueError(f"{names[0]!r} must be channel-first 3D, got shape {tuple(np.shape(d[names[0]]))}")
        for name in names[1:]:
            if _spatial_shape(d[name]) != shape:
                raise ValueError(
                    f"{name!r} has spatial shape {_spatial_shape(d[name])}, expected {shape} like {names[0]!r}"
                )
        return shape

    def _apply(self, d: dict[Hashable, object], box: CropPadBox) -> dict[Hashable, object]:
        """Crop then pad every present key with ``box`` (recorded for inverse by the persistent Crop/Pad)."""
        for key, mode in self.key_iterator(d, self.mode):
            cropped = self._cropper(d[key], slices=box.slices, lazy=False)
            d[key] = self._padder(cropped, to_pad=box.to_pad, mode=mode, lazy=False)
        return d

    def inverse(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Undo the pad then the crop on every present key, restoring the pre-crop shape (outside filled with 0)."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._cropper.inverse(self._padder.inverse(d[key]))
        return d


class CropOrPadAroundLabeld(Randomizable, _CropOrPadd):
    """Crop-or-pad all keys to ``spatial_size`` around the label's foreground bounding-box centre (training/eval).

    The centre is the centre of the bounding box of ``label > 0`` (any channel) plus, per axis, a uniform random
    integer offset in ``[-jitter, jitter]`` drawn from ``self.R`` (``jitter=0`` is deterministic). The window is
    moved inside the image where the image is large enough and padded (``mode``, per key, default constant 0)
    where it is not; see :func:`compute_crop_or_pad_box`. An empty label (no lesion) is not an error: the image
    centre (plus jitter) is used. All keys must share the label's spatial shape. Invertible (``Invertd``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: Hashable = "label",
        spatial_size: int | Sequence[int] = 128,
        jitter: int | Sequence[int] = 0,
        mode: str | Sequence[str] = "constant",
        allow_missing_keys: bool = False,
    ) -> None:
        """Configure keys, the label that defines the centre, the output size and the random centre jitter."""
        _CropOrPadd.__init__(self, keys, spatial_size, mode, allow_missing_keys)
        self.label_key = label_key
        self.jitter = tuple(int(j) for j in ensure_tuple_rep(jitter, SPATIAL_DIMS))
        if any(j < 0 for j in self.jitter):
            raise ValueError(f"jitter must be >= 0, got {jitter!r}")
        self._offset: tuple[int, ...] = (0,) * SPATIAL_DIMS

    def randomize(self, data: object = None) -> None:
        """Draw this call's per-axis centre offset from ``self.R`` (no draw when ``jitter`` is 0)."""
        if any(self.jitter):
            self._offset = tuple(int(self.R.randint(-j, j + 1)) for j in self.jitter)
        else:
            self._offset = (0,) * SPATIAL_DIMS

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Return a shallow copy of ``data`` with every key cropped/padded to ``spatial_size`` around the lesion."""
        d = dict(data)
        if self.label_key not in d:
            raise KeyError(f"label_key {self.label_key!r} is not in the data (keys: {list(d)})")
        shape = self._common_shape(d, reference=self.label_key)
        self.randomize()
        center = [c + o for c, o in zip(foreground_bbox_center(d[self.label_key]), self._offset)]
        return self._apply(d, compute_crop_or_pad_box(shape, center, self.spatial_size))


def foreground_bbox_center(label: object) -> tuple[float, ...]:
    """Centre (voxel coords) of the bounding box of ``label > 0`` over all channels; the image centre if empty."""
    if isinstance(label, MetaTensor):
        label = label.as_tensor()
    fg = (torch.as_tensor(label if isinstance(label, torch.Tensor) else np.asarray(label)) > 0).any(dim=0)
    shape = tuple(fg.shape)
    if not bool(fg.any()):
        return tuple((s - 1) / 2 for s in shape)
    center = []
    for axis in range(fg.ndim):
        other = tuple(a for a in range(fg.ndim) if a != axis)
        idx = torch.nonzero(fg.any(dim=other) if other else fg).flatten()
        center.append((int(idx[0]) + int(idx[-1])) / 2)
    return tuple(center)


def _as_coordinate(value: object) -> int | None:
    """Return ``value`` as an int if it is an integer or an integral float (bools excluded), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    return None


def parse_clicks(value: object, key: Hashable = "clicks") -> torch.Tensor:
    """Parse clicks (list of ``[i, j, k]``, JSON string, array, None) into an int64 ``[N, 3]`` tensor, or raise.

    Accepts ints and integral floats; rejects bools, non-integral floats, and anything that is not a list of
    3-element lists, with a ValueError naming ``key`` and the offending value. None and "" mean no click.
    """
    raw = value
    if value is None:
        return torch.zeros((0, SPATIAL_DIMS), dtype=torch.int64)
    if isinstance(value, str):
        if not value.strip():
            return torch.zeros((0, SPATIAL_DIMS), dtype=torch.int64)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{key!r}: cannot parse clicks string {raw!r} as JSON ({err})") from err
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key!r} must be a list of [i, j, k] voxel indices, got {type(raw).__name__}: {raw!r}")
    clicks = []
    for n, click in enumerate(value):
        if isinstance(click, (torch.Tensor, np.ndarray)):
            click = click.tolist()
        if not isinstance(click, (list, tuple)) or len(click) != SPATIAL_DIMS:
            raise ValueError(
                f"{key!r}: click #{n} is {click!r}, expected a list of {SPATIAL_DIMS} integer voxel indices [i, j, k]"
                f" (clicks must be a list of such lists, e.g. [[i, j, k]]); got {raw!r}"
            )
        coords = [_as_coordinate(c) for c in click]
        bad = [c for c, v in zip(click, coords) if v is None]
        if bad:
            raise ValueError(f"{key!r}: click #{n} {list(click)!r} has non-integer voxel index {bad[0]!r}")
        clicks.append(coords)
    if not clicks:
        return torch.zeros((0, SPATIAL_DIMS), dtype=torch.int64)
    return torch.tensor(clicks, dtype=torch.int64)


def _meta_array(ref: MetaTensor, name: str, ref_key: Hashable) -> np.ndarray:
    """Fetch ``ref.meta[name]`` as a float64 numpy array, with a clear error when LoadImaged did not set it."""
    if name not in ref.meta:
        raise ValueError(
            f"reference image {ref_key!r} has no meta[{name!r}]; load it with monai.transforms.LoadImaged so the "
            "on-disk geometry is known"
        )
    value = ref.meta[name]
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return value.astype(np.float64)


class MapClicksToImaged(MapTransform):
    """Map click voxel indices from the on-disk grid (MONAI Label convention) to the reference image's current grid.

    Each click ``[i, j, k]`` indexes the NIfTI data array as stored on disk (before Orientation/Spacing). It is
    validated against ``ref.meta["spatial_shape"]``, sent to world space with ``ref.meta["original_affine"]``,
    brought back with the inverse of the reference's current affine, rounded and clamped to the current grid.
    Outputs int64 ``[N, 3]`` tensors (``[0, 3]`` for an empty or missing list). Raises ValueError when no key holds
    a click. Not invertible (clicks are inputs, not images).
    """

    def __init__(
        self,
        keys: KeysCollection = ("foreground", "background"),
        ref_image_key: Hashable = "image",
        allow_missing_keys: bool = True,
    ) -> None:
        """Configure the click keys and the (already oriented/resampled) reference image key."""
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.ref_image_key = ref_image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Return a shallow copy of ``data`` with every click key as int64 ``[N, 3]`` indices into the current grid."""
        d = dict(data)
        for key in self.keys:
            if key not in d and not self.allow_missing_keys:
                raise KeyError(f"click key {key!r} is not in the data (keys: {list(d)})")
        clicks = {key: parse_clicks(d.get(key), key) for key in self.keys}
        if all(len(c) == 0 for c in clicks.values()):
            raise ValueError(f"no click given: all of {list(self.keys)} are empty or missing")
        ref = d.get(self.ref_image_key)
        if not isinstance(ref, MetaTensor):
            raise ValueError(f"reference image {self.ref_image_key!r} must be a MetaTensor, got {type(ref).__name__}")
        disk_shape = tuple(int(s) for s in _meta_array(ref, "spatial_shape", self.ref_image_key)[:SPATIAL_DIMS])
        for key, pts in clicks.items():
            outside = [p for p in pts.tolist() if any(not 0 <= v < s for v, s in zip(p, disk_shape))]
            if outside:
                raise ValueError(
                    f"{key!r}: click {outside[0]} is outside the image volume of shape {disk_shape} "
                    "(voxel indices of the on-disk array must satisfy 0 <= index < shape on each axis)"
                )
        self._refuse_contradicting_clicks(clicks)
        disk_to_world = _meta_array(ref, "original_affine", self.ref_image_key)
        current = ref.peek_pending_affine()  # == ref.affine unless lazy resampling left operations pending
        world_to_grid = np.linalg.inv(torch.as_tensor(current).detach().cpu().numpy().astype(np.float64))
        disk_to_grid = torch.from_numpy(world_to_grid @ disk_to_world)
        upper = torch.tensor([int(s) for s in ref.peek_pending_shape()], dtype=torch.int64) - 1
        for key, pts in clicks.items():
            homog = torch.cat([pts.to(torch.float64), torch.ones((len(pts), 1), dtype=torch.float64)], dim=1)
            mapped = (homog @ disk_to_grid.T)[:, :SPATIAL_DIMS]
            d[key] = torch.floor(mapped + 0.5).to(torch.int64).clamp(min=torch.zeros_like(upper), max=upper)
        d[ON_DISK_KEY] = {key: pts.tolist() for key, pts in clicks.items()}  # for messages in the user's coordinates
        return d

    @staticmethod
    def _refuse_contradicting_clicks(clicks: Mapping[Hashable, torch.Tensor]) -> None:
        """One voxel clicked under two keys (foreground and background) asks for opposite answers: refuse it."""
        seen: dict[tuple[int, ...], Hashable] = {}
        for key, pts in clicks.items():
            for point in {tuple(p) for p in pts.tolist()}:
                if point in seen:
                    raise ValueError(
                        f"click {list(point)} is both {seen[point]!r} and {key!r}: one voxel cannot be inside and "
                        "outside the lesion; remove one of the two clicks"
                    )
                seen[point] = key


class CropOrPadAroundClicksd(_CropOrPadd):
    """Crop-or-pad image keys to ``spatial_size`` around the clicks and shift the clicks into the window (inference).

    The centre is the first foreground click (``center="first"``: the window, and so the cached image embedding, stays
    put while the user adds clicks), the mean of the foreground clicks (``center="foreground"``), or of all clicks
    (``center="all"``); without a foreground click the background clicks stand in. Clicks must already index the current grid (see
    :class:`MapClicksToImaged`); they are rewritten as int64 ``[N, 3]`` indices into the window. A ValueError is
    raised, before anything is cropped, when a click falls outside the window: the model only sees ``spatial_size``
    voxels. Invertible for the image keys (``Invertd``); the clicks are not inverted.

    With ``multi_window`` nothing is refused for being far apart: the foreground clicks (or, without any, all clicks)
    are grouped so that each group fits one window with a margin of ``spatial_size // 8`` (:func:`group_clicks`), each
    group gets a window centred on its clicks, and the crop is the box holding every window. ``windows_key`` then holds
    each window's start in the box (int64 ``[G, 3]``) and ``groups_key`` the window of each foreground click (``[N]``);
    ``ClickInferer`` runs the model once per window and merges. Clicks that fit one window take the path above, with
    one window at ``[0, 0, 0]``. ``grow_margin`` (voxels, needs ``multi_window``) widens the box around the windows,
    within the image, so that ``ClickInferer(max_grow_windows=...)`` can add windows along a lesion that leaves them.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        click_keys: Sequence[Hashable] = ("foreground", "background"),
        spatial_size: int | Sequence[int] = 128,
        center: str = "foreground",
        mode: str | Sequence[str] = "constant",
        allow_missing_keys: bool = False,
        multi_window: bool = False,
        windows_key: Hashable = "click_windows",
        groups_key: Hashable = "click_groups",
        grow_margin: int = 0,
    ) -> None:
        """Configure the image keys, the click keys (the first one is the foreground) and how the centre is chosen."""
        _CropOrPadd.__init__(self, keys, spatial_size, mode, allow_missing_keys)
        self.multi_window, self.windows_key, self.groups_key = bool(multi_window), windows_key, groups_key
        if isinstance(grow_margin, bool) or not isinstance(grow_margin, int) or grow_margin < 0:
            raise ValueError(f"grow_margin must be a non-negative integer (voxels), got {grow_margin!r}")
        if grow_margin and not multi_window:
            raise ValueError("grow_margin needs multi_window=True (the grown windows are recorded as click windows)")
        self.grow_margin = grow_margin
        self.click_keys = tuple(click_keys)
        if not self.click_keys:
            raise ValueError("click_keys must name at least one key")
        if center not in CENTER_MODES:
            raise ValueError(f"center must be one of {CENTER_MODES}, got {center!r}")
        self.center = center

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Return a shallow copy of ``data`` with image keys cropped/padded around the clicks and the clicks shifted."""
        d = dict(data)
        on_disk = d.pop(ON_DISK_KEY, None)  # set by MapClicksToImaged; read for messages only, not passed on
        clicks = {key: parse_clicks(d[key], key) for key in self.click_keys if key in d}
        every = torch.cat([torch.zeros((0, SPATIAL_DIMS), dtype=torch.int64), *clicks.values()])
        if len(every) == 0:
            raise ValueError(f"no click given: all of {list(self.click_keys)} are empty or missing")
        fg = clicks.get(self.click_keys[0], every[:0])
        centre_pts = fg if self.center != "all" and len(fg) else every
        if self.center == "first":
            centre_pts = centre_pts[:1]
        shape = self._common_shape(d)
        box = compute_crop_or_pad_box(shape, centre_pts.to(torch.float64).mean(dim=0).tolist(), self.spatial_size)
        shifted = {key: box.to_window(pts) for key, pts in clicks.items()}
        size = torch.tensor(self.spatial_size, dtype=torch.int64)
        outside = {
            key: [c for c, s in zip(clicks[key].tolist(), pts) if bool(((s < 0) | (s >= size)).any())]
            for key, pts in shifted.items()
        }
        outside = {key: pts for key, pts in outside.items() if pts}
        if (outside or self.grow_margin) and self.multi_window:
            return self._several_windows(d, clicks, fg, every, shape, on_disk)
        if outside:
            if on_disk:
                outside = {k: [on_disk[k][clicks[k].tolist().index(c)] for c in pts] for k, pts in outside.items()}
            where = "voxel indices of the image as given" if on_disk else "voxel indices in the preprocessed image"
            raise ValueError(
                f"the clicks span more than the {'x'.join(map(str, self.spatial_size))} field of view the model "
                f"sees{self._fov_mm(d)}: clicks {outside} ({where}) fall outside the "
                f"window {list(box.window_start)}..{[s + r - 1 for s, r in zip(box.window_start, self.spatial_size)]}"
                " centred on the clicks; place all clicks closer together"
            )
        d.update(shifted)
        if self.multi_window:
            d[self.windows_key] = torch.zeros((1, SPATIAL_DIMS), dtype=torch.int64)
            d[self.groups_key] = torch.zeros(len(fg), dtype=torch.int64)
        return self._apply(d, box)

    def _several_windows(
        self,
        d: dict[Hashable, object],
        clicks: dict[Hashable, torch.Tensor],
        fg: torch.Tensor,
        every: torch.Tensor,
        shape: tuple[int, ...],
        on_disk: Mapping[Hashable, list] | None = None,
    ) -> dict[Hashable, object]:
        """Crop the box that holds one window per group of clicks; record the windows and the clicks' groups."""
        anchors = fg if len(fg) else every
        margin = [r // 8 for r in self.spatial_size]
        groups = group_clicks(anchors, self.spatial_size, margin)
        starts = []
        for g in range(int(groups.max()) + 1):
            pts = anchors[groups == g].to(torch.float64)
            centre = ((pts.min(dim=0).values + pts.max(dim=0).values) / 2).tolist()
            starts.append(compute_crop_or_pad_box(shape, centre, self.spatial_size).window_start)
        start = torch.tensor(starts, dtype=torch.int64)
        low = start.min(dim=0).values
        high = (start + torch.tensor(self.spatial_size, dtype=torch.int64)).max(dim=0).values
        if self.grow_margin:  # room to grow along a lesion, but never past the image (padding there holds no lesion)
            extent = torch.tensor(shape, dtype=torch.int64)
            low = torch.minimum(low, (low - self.grow_margin).clamp(min=0))
            high = torch.maximum(high, torch.minimum(high + self.grow_margin, extent))
        if not self.grow_margin:  # with room to grow, a later window may still reach such a click
            self._refuse_clicks_in_no_window(d, clicks, start, on_disk or {})
        box = box_from_extent(shape, low.tolist(), (high - low).tolist())
        d.update({key: box.to_window(pts) for key, pts in clicks.items()})
        d[self.windows_key] = start - low
        d[self.groups_key] = groups if len(fg) else torch.zeros(0, dtype=torch.int64)
        return self._apply(d, box)

    def _refuse_clicks_in_no_window(
        self,
        d: Mapping[Hashable, object],
        clicks: dict[Hashable, torch.Tensor],
        starts: torch.Tensor,
        on_disk: Mapping[Hashable, list],
    ) -> None:
        """A click (a background one: the windows follow the foreground) that no window holds is one the model never
        sees: refuse it, naming it as the user gave it (on-disk voxel indices, when :class:`MapClicksToImaged` ran)."""
        size = torch.tensor(self.spatial_size, dtype=torch.int64)
        for key, pts in clicks.items():
            inside = ((pts[:, None] >= starts[None]) & (pts[:, None] < starts[None] + size)).all(dim=-1).any(dim=1)
            if bool(inside.all()):
                continue
            given = on_disk.get(key)
            shown = [given[i] if given else pts[i].tolist() for i in torch.nonzero(~inside).flatten().tolist()]
            where = "voxel indices of the image as given" if given else "voxel indices in the preprocessed image"
            raise ValueError(
                f"{key!r}: click(s) {shown} ({where}) lie outside every {'x'.join(map(str, self.spatial_size))} "
                f"window the model sees{self._fov_mm(d)}, which follow the foreground clicks; place them within the "
                "lesion's window, or add a foreground click near them"
            )

    def _fov_mm(self, d: Mapping[Hashable, object]) -> str:
        """Describe the window's physical size from the first image's affine, for error messages (empty if unknown)."""
        img = next(iter(self.key_iterator(d)), None)
        if img is None or not isinstance(d[img], MetaTensor):
            return ""
        spacing = torch.linalg.norm(d[img].affine[:SPATIAL_DIMS, :SPATIAL_DIMS].to(torch.float64), dim=0).tolist()
        return " (" + " x ".join(f"{r * s:.1f}" for r, s in zip(self.spatial_size, spacing)) + " mm)"
