"""Window growth for several-window inference: where the clicked lesion leaves its model windows, which window to add
next and the click that seeds it.

The trigger does not need the predicted mask to reach a window face. A model that segments a precise piece around a
click leaves a long lesion inside its window, so the lesion's extent is estimated from the image instead
(:func:`lesion_extent`): the voxels connected to the clicked windows' mask whose intensity lies within ``band`` robust
standard deviations of that mask's median intensity. Wherever that estimate (which includes the mask) crosses a window
face that is not the input's edge, a window shifted by half a window across the face is proposed. No model runs here;
``ClickInferer`` decodes each proposed window and passes the merged mask back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from ..clicks.sampling import deepest_voxel

Start = tuple[int, int, int]
MAD_TO_STD = 1.4826  # the median absolute deviation of a normal distribution times this is its standard deviation


def lesion_extent(image: np.ndarray, mask: np.ndarray, band: float) -> np.ndarray:
    """``mask`` plus the voxels connected to it within ``band`` robust std (1.4826 MAD) of its median intensity.

    An estimate of how far the segmented lesion reaches beyond the predicted piece; face-connected components of the
    intensity band that share a voxel with ``mask``. ``band <= 0`` or an empty mask gives ``mask`` itself.
    """
    mask = np.asarray(mask, dtype=bool)
    if band <= 0 or not mask.any():
        return mask.copy()
    values = image[mask]
    median = float(np.median(values))
    spread = MAD_TO_STD * float(np.median(np.abs(values - median)))
    similar = np.abs(image - median) <= band * spread
    components, _ = ndimage.label(similar)
    touched = np.unique(components[mask & similar])
    return mask | np.isin(components, touched[touched > 0])


class WindowGrowth:
    """Proposes, one at a time, the windows to add along the clicked lesion, each with its positive seed click.

    ``image`` and ``mask`` (the clicked windows' merged prediction) are ``[D, H, W]`` over the whole input; ``starts``
    are the clicked windows of ``window`` voxels per side. The lesion estimate is made once, per clicked window, from
    the mask inside it (lesions clicked in different windows keep their own intensities). :meth:`next_window` takes
    the mask so far (the estimate follows it too) and returns the unseen window across the face the most estimate
    voxels cross, over every window so far (so a lesion's long axis gets the budget before a side branch), or None.
    """

    def __init__(
        self,
        image: torch.Tensor | np.ndarray,
        mask: torch.Tensor | np.ndarray,
        starts: Sequence[Sequence[int]],
        window: int,
        band: float = 2.0,
    ) -> None:
        image_np, mask_np = _numpy(image).astype(np.float32, copy=False), _numpy(mask).astype(bool, copy=False)
        if image_np.shape != mask_np.shape or image_np.ndim != 3:
            raise ValueError(f"image and mask must be [D, H, W] of one shape, got {image_np.shape}, {mask_np.shape}")
        self.window, self.extent = int(window), tuple(int(n) for n in image_np.shape)
        self.seen: list[Start] = [tuple(int(a) for a in s) for s in starts]  # type: ignore[misc]
        self.lesion = np.zeros_like(mask_np)
        for start in self.seen:
            clicked = np.zeros_like(mask_np)
            clicked[self._box(start)] = mask_np[self._box(start)]
            self.lesion |= lesion_extent(image_np, clicked, band)

    def _box(self, start: Sequence[int]) -> tuple[slice, ...]:
        """The index box of the window starting at ``start``."""
        return tuple(slice(a, a + self.window) for a in start)

    def next_window(self, mask: torch.Tensor | np.ndarray) -> tuple[Start, tuple[int, int, int]] | None:
        """The next window to add (its start) and its seed click (window coordinates), or None; marks it as seen.

        The click is the deepest voxel (as the ``center`` click rule) of the estimate not yet in ``mask`` inside the
        new window, or of the mask there when the estimate holds nothing more (the lesion leaves only as masked).
        """
        mask_np = _numpy(mask).astype(bool, copy=False)
        estimate = self.lesion | mask_np
        size, crossing, new = self.window, 0, None
        for start in self.seen:
            inside = estimate[self._box(start)]
            for axis in range(3):
                for side in (-1, 1):
                    shifted = list(start)
                    shifted[axis] = min(max(start[axis] + side * (size // 2), 0), self.extent[axis] - size)
                    count = int(inside.take(0 if side < 0 else size - 1, axis=axis).sum())
                    if tuple(shifted) not in self.seen and count > crossing:
                        crossing, new = count, tuple(shifted)
        if new is None:
            return None
        self.seen.append(new)  # type: ignore[arg-type]
        box = self._box(new)
        unsegmented = estimate[box] & ~mask_np[box]
        return new, deepest_voxel(unsegmented if unsegmented.any() else mask_np[box])  # type: ignore[return-value]


def _numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CPU numpy view of a tensor (or the array itself)."""
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
