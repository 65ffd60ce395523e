"""Click simulation for the iterative refinement loop: pick the next point prompt from the current prediction's errors.

Two strategies are provided:

* ``"random"`` (the M-SAM training reference): one voxel drawn uniformly from the union of the false-negative and
  false-positive regions, so each region is hit in proportion to its volume. Positive (label 1) if it lies in the false
  negatives, negative (label 0) if it lies in the false positives. Runs in torch on the input's device; only the index
  draw uses the given ``numpy.random.RandomState``.
* ``"center"`` (deterministic evaluation): the larger of the two error regions (FN wins ties), clicked at its voxel of
  maximum Euclidean distance to the region's boundary, with the image edge counting as boundary (first maximum in C
  order on ties). Runs through numpy/scipy on the CPU and consumes no random numbers.
* ``"interior"`` (SAM-Med3D / RITM-style training clicks): the largest connected error region (FN or FP, by volume),
  clicked at a voxel drawn uniformly from its interior, the voxels at least half as deep as its deepest one. Positive
  if the region is a false negative. Runs through numpy/scipy; one ``randint`` from the given ``RandomState``.

When there is no prediction yet (``pred is None``) it is treated as all background, so the first click is a lesion
voxel. When there is nothing left to correct (perfect prediction, or an empty lesion before any prediction) a padding
click is returned: point ``(0, 0, 0)``, label ``-1`` (the prompt encoder's "not a point" token) and ``valid=False``. No
random number is drawn for a padding click.

Coordinates are ``(d, h, w)`` int64 indices into the spatial dims of a ``[D, H, W]`` volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "Click",
    "PADDING_LABEL",
    "STRATEGIES",
    "THRESHOLD_ON",
    "error_regions",
    "sample_click",
    "sample_clicks_batch",
]

PADDING_LABEL = -1
STRATEGIES = ("random", "center", "interior")
THRESHOLD_ON = ("logits", "probability")


@dataclass(frozen=True, eq=False)
class Click:
    """One simulated click: ``point`` int64 ``[3]`` (d, h, w), ``label`` 1/0/-1, ``valid`` False for a padding click."""

    point: torch.Tensor
    label: int
    valid: bool

    def __eq__(self, other: object) -> bool:
        """Compare by value (tensors compared element-wise, on the CPU) so clicks can be checked for equality."""
        if not isinstance(other, Click):
            return NotImplemented
        same_point = torch.equal(self.point.detach().cpu(), other.point.detach().cpu())
        return same_point and self.label == other.label and self.valid == other.valid

    __hash__ = None  # type: ignore[assignment]  # holds a tensor, so not hashable


def _plain(x: torch.Tensor) -> torch.Tensor:
    """View a tensor subclass (e.g. MONAI ``MetaTensor``) as a plain tensor so no metadata is tracked or copied."""
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def spatial_volume(x: torch.Tensor, name: str) -> torch.Tensor:
    """Return the ``[D, H, W]`` view of a ``[D, H, W]`` or ``[1, D, H, W]`` tensor, rejecting any other shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    x = _plain(x)
    if x.ndim == 4 and x.shape[0] == 1:
        return x[0]
    if x.ndim == 3:
        return x
    raise ValueError(f"{name} must have shape [D,H,W] or [1,D,H,W], got {tuple(x.shape)}")


def check_threshold(threshold: float, threshold_on: str) -> None:
    """Validate the threshold settings, naming the offending value in the error."""
    if threshold_on not in THRESHOLD_ON:
        raise ValueError(f"threshold_on must be one of {THRESHOLD_ON}, got {threshold_on!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if threshold_on == "probability" and not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly in (0, 1) when threshold_on='probability', got {threshold!r}")


def error_regions(
    pred: torch.Tensor | None, label: torch.Tensor, threshold: float = 0.5, threshold_on: str = "logits"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(fn, fp)`` masks of shape ``[D, H, W]``: lesion voxels the prediction misses, and its spurious voxels.

    ``label`` (lesion where > 0) and ``pred`` may be ``[D,H,W]`` or ``[1,D,H,W]``. ``pred`` is foreground where
    ``pred > threshold`` (``threshold_on="logits"``, the M-SAM reference) or ``sigmoid(pred) > threshold``
    (``threshold_on="probability"``, threshold in (0, 1)). ``pred=None`` means "no prediction yet" (all background).
    """
    check_threshold(threshold, threshold_on)
    gt = spatial_volume(label, "label") > 0
    if pred is None:
        return gt.clone(), torch.zeros_like(gt)
    p = spatial_volume(pred, "pred").detach()
    if p.shape != gt.shape:
        raise ValueError(f"pred spatial shape {tuple(p.shape)} does not match label spatial shape {tuple(gt.shape)}")
    if p.device != gt.device:
        raise ValueError(f"pred is on {p.device} but label is on {gt.device}")
    if threshold_on == "probability":
        p = torch.sigmoid(p.float())
    fg = p > threshold
    return gt & ~fg, fg & ~gt


def _padding_click(device: torch.device) -> Click:
    """The "no new information" click emitted when there is no error left to correct."""
    return Click(point=torch.zeros(3, dtype=torch.int64, device=device), label=PADDING_LABEL, valid=False)


def _random_click(fn: torch.Tensor, fp: torch.Tensor, rng: np.random.RandomState) -> Click:
    """Uniform draw over FN ∪ FP in torch; the index comes from ``rng`` so seeding the RandomState reproduces it."""
    err = (fn | fp).reshape(-1)
    count = int(err.sum())
    if count == 0:
        return _padding_click(fn.device)
    k = int(rng.randint(count))
    flat = torch.nonzero(err)[k, 0]
    point = torch.stack(torch.unravel_index(flat, fn.shape)).to(torch.int64)
    return Click(point=point, label=1 if bool(fn.reshape(-1)[flat]) else 0, valid=True)


def _bounding_box(region: np.ndarray) -> tuple[slice, ...]:
    """The tight bounding box of a non-empty boolean volume, as slices."""
    return tuple(
        slice(int(idx[0]), int(idx[-1]) + 1)
        for idx in (np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3))
    )


def _region_depth(region: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Distance of each voxel of ``region``'s bounding box to the region's boundary (image edge counts as boundary).

    The EDT runs on the bounding box padded with one background voxel per side, which gives exactly the distances of
    the whole zero-padded volume (the nearest background voxel is never farther than the padding layer) and keeps C
    order inside the box, while being much cheaper for small regions. Returns the distances and the box.
    """
    box = _bounding_box(region)
    return ndimage.distance_transform_edt(np.pad(region[box], 1, constant_values=False))[1:-1, 1:-1, 1:-1], box


def deepest_voxel(region: np.ndarray) -> tuple[int, int, int]:
    """Voxel of maximum distance to the region's boundary (image edge counts as boundary; first maximum in C order)."""
    dist, box = _region_depth(region)
    idx = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return tuple(int(i) + b.start for i, b in zip(idx, box))  # type: ignore[return-value]


def _center_click(fn: torch.Tensor, fp: torch.Tensor) -> Click:
    """Deterministic click at the deepest voxel of the larger error region (FN on ties), positive iff from FN."""
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn == 0 and n_fp == 0:
        return _padding_click(fn.device)
    positive = n_fn >= n_fp
    region = (fn if positive else fp).cpu().numpy()
    point = torch.tensor(deepest_voxel(region), dtype=torch.int64, device=fn.device)
    return Click(point=point, label=1 if positive else 0, valid=True)


def _interior_click(fn: torch.Tensor, fp: torch.Tensor, rng: np.random.RandomState) -> Click:
    """Uniform draw over the inner half (by depth) of the largest connected error region; positive iff it is an FN."""
    if not bool(fn.any()) and not bool(fp.any()):
        return _padding_click(fn.device)
    best: tuple[int, bool, np.ndarray] | None = None
    for positive, errors in ((True, fn), (False, fp)):
        components, count = ndimage.label(errors.cpu().numpy())
        if count == 0:
            continue
        sizes = np.bincount(components.reshape(-1))[1:]
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), positive, components == largest + 1)
    assert best is not None
    _, positive, region = best
    dist, box = _region_depth(region)  # candidates in C order of the box = their C order in the volume
    candidates = np.flatnonzero(dist >= 0.5 * dist.max())
    flat = int(candidates[int(rng.randint(len(candidates)))])
    point = torch.tensor(
        [int(i) + b.start for i, b in zip(np.unravel_index(flat, dist.shape), box)], dtype=torch.int64, device=fn.device
    )
    return Click(point=point, label=1 if positive else 0, valid=True)


def sample_click(
    pred: torch.Tensor | None,
    label: torch.Tensor,
    rng: np.random.RandomState | None,
    strategy: str = "random",
    threshold: float = 0.5,
    threshold_on: str = "logits",
) -> Click:
    """Simulate the next click for one sample from its prediction errors, to train/evaluate the model interactively.

    ``pred`` (logits, or None before the first prediction) and ``label`` are ``[D,H,W]`` or ``[1,D,H,W]`` on the same
    device; the returned point is on that device. ``rng`` is required for ``strategy="random"`` (one ``randint`` call
    per valid click, none for a padding click) and for ``"interior"``, and ignored for ``"center"``. Edge cases: perfect prediction, or an
    empty lesion with no prediction, give the padding click ``(0,0,0)``/label -1/``valid=False``; an empty lesion with
    a prediction gives a negative click in the false positives.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in ("random", "interior") and not isinstance(rng, np.random.RandomState):
        raise TypeError(f"strategy={strategy!r} needs a numpy.random.RandomState as rng, got {type(rng).__name__}")
    fn, fp = error_regions(pred, label, threshold=threshold, threshold_on=threshold_on)
    if strategy == "random":
        return _random_click(fn, fp, rng)  # type: ignore[arg-type]
    if strategy == "interior":
        return _interior_click(fn, fp, rng)  # type: ignore[arg-type]
    return _center_click(fn, fp)


def sample_clicks_batch(
    pred: torch.Tensor | None,
    label: torch.Tensor,
    rng: np.random.RandomState | None,
    strategy: str = "random",
    threshold: float = 0.5,
    threshold_on: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`sample_click` for the engines: ``[B,1,D,H,W]`` in, points ``[B,1,3]`` / labels ``[B,1]`` out.

    Samples are processed in batch order with the same ``rng``, so the result equals calling :func:`sample_click` on
    each sample in turn. Padding clicks appear as point ``(0,0,0)`` with label -1. Outputs are on ``label``'s device.
    """
    if not isinstance(label, torch.Tensor):
        raise TypeError(f"label must be a torch.Tensor, got {type(label).__name__}")
    if label.ndim != 5 or label.shape[1] != 1:
        raise ValueError(f"label must have shape [B,1,D,H,W], got {tuple(label.shape)}")
    if pred is not None and (not isinstance(pred, torch.Tensor) or pred.shape != label.shape):
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"pred must be None or a tensor of the label's shape {tuple(label.shape)}, got {got}")
    clicks = [
        sample_click(None if pred is None else pred[b], label[b], rng, strategy, threshold, threshold_on)
        for b in range(label.shape[0])
    ]
    device = label.device
    points = torch.zeros(len(clicks), 1, 3, dtype=torch.int64, device=device)
    for b, c in enumerate(clicks):
        points[b, 0] = c.point
    labels = torch.tensor([[c.label] for c in clicks], dtype=torch.int64, device=device).reshape(-1, 1)
    return points, labels
