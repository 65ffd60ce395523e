"""Damaged copies of a ground-truth mask, as the starting masks of the "edit an existing segmentation" benchmark.

An annotator who corrects an automatic segmentation meets a few typical faults: boundaries too wide or too tight, a
lesion missed, a non-lesion segmented. :class:`DamageMaskd` makes each of them from the label, deterministically (the
same case always gets the same damage), so the number of clicks needed from each start can be compared with starting
from nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from itertools import product

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = ["DAMAGES", "DamageMaskd", "damage_mask"]

DAMAGES = ("none", "dilate", "erode", "drop_lesion", "add_false_positive")


def _displaced_copy(components: np.ndarray, lesion: np.ndarray, margin: int) -> np.ndarray:
    """``lesion`` moved to the first place (fixed search order, nearest shifts first) where it lies wholly inside the
    volume and at least ``margin`` voxels from every lesion; empty when nothing fits."""
    shape = np.array(components.shape)
    occupied = ndimage.binary_dilation(components > 0, iterations=margin)
    coords = np.argwhere(lesion)
    extent = coords.max(0) - coords.min(0) + 1
    steps = sorted(
        (
            s
            for s in product(*[range(-int(n), int(n) + 1, max(int(e), 1)) for n, e in zip(shape // 2, extent)])
            if any(s)
        ),
        key=lambda s: (sum(abs(v) for v in s), s),
    )
    for shift in steps:
        moved = coords + np.array(shift)
        if (moved < 0).any() or (moved >= shape).any():
            continue
        if not occupied[tuple(moved.T)].any():
            out = np.zeros(components.shape, dtype=bool)
            out[tuple(moved.T)] = True
            return out
    return np.zeros(components.shape, dtype=bool)


def damage_mask(label: np.ndarray, damage: str, iterations: int = 2) -> np.ndarray:
    """A damaged copy of a binary ``[D, H, W]`` mask.

    ``dilate``/``erode``: ``iterations`` voxels wider/narrower; ``drop_lesion``: the smallest connected lesion removed;
    ``add_false_positive``: a copy of the smallest lesion added where it touches no lesion; ``none``: unchanged.
    """
    if damage not in DAMAGES:
        raise ValueError(f"damage must be one of {DAMAGES}, got {damage!r}")
    mask = np.asarray(label) > 0
    if damage == "none" or not mask.any():
        return mask.copy()
    if damage == "dilate":
        return ndimage.binary_dilation(mask, iterations=iterations)
    if damage == "erode":
        return ndimage.binary_erosion(mask, iterations=iterations)
    components, count = ndimage.label(mask)
    sizes = np.bincount(components.reshape(-1))[1:]
    smallest = components == 1 + int(np.argmin(sizes))
    if damage == "drop_lesion":
        return mask & ~smallest
    return mask | _displaced_copy(components, smallest, margin=iterations)


class DamageMaskd(MapTransform):
    """Write a damaged copy of ``data[key]`` (``[1, D, H, W]``, lesion > 0) to ``output_key`` (float 0/1, same shape).

    Used by ``evaluate.yaml --eval_start <damage>`` to start the click loop from an imperfect mask (see
    :func:`damage_mask` for the damages).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        output_key: Hashable = "initial_mask",
        damage: str = "dilate",
        iterations: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"DamageMaskd takes one label key, got {keys!r}")
        if damage not in DAMAGES:
            raise ValueError(f"damage must be one of {DAMAGES}, got {damage!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self.output_key, self.damage, self.iterations = output_key, damage, iterations

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            if label.ndim != 4 or label.shape[0] != 1:
                raise ValueError(f"{key!r} must be [1, D, H, W] to damage, got {list(label.shape)}")
            mask = damage_mask(label[0].detach().cpu().numpy(), self.damage, self.iterations)
            d[self.output_key] = torch.as_tensor(mask[None], dtype=torch.float32)
        return d
