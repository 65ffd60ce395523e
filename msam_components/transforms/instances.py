"""One label value per clicked lesion: ``inference.yaml --instances true`` writes instances instead of a binary mask."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from .spatial import parse_clicks

__all__ = ["ClickInstancesd", "click_instances"]


def click_instances(mask: np.ndarray, clicks: np.ndarray) -> np.ndarray:
    """Number the connected objects (26-connected) of a binary ``[D, H, W]`` mask: the objects holding a foreground
    click get 1, 2, ... in the order of their first click; objects without a click follow (nothing predicted is
    dropped). ``clicks`` are ``[N, 3]`` voxel indices into ``mask``."""
    objects, count = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), dtype=bool))
    order: list[int] = []
    for click in np.asarray(clicks, dtype=np.int64).reshape(-1, 3):
        if any(not 0 <= c < s for c, s in zip(click, objects.shape)):
            raise ValueError(f"click {click.tolist()} is outside the mask of shape {list(objects.shape)}")
        index = int(objects[tuple(click)])
        if index and index not in order:
            order.append(index)
    order += [i for i in range(1, count + 1) if i not in order]
    table = np.zeros(count + 1, dtype=np.int32)
    table[order] = np.arange(1, len(order) + 1)
    return table[objects]


class ClickInstancesd(MapTransform):
    """Turn the binary mask of ``keys`` (``[1, D, H, W]``, in the input image's grid) into instance values by
    :func:`click_instances` with the request's foreground clicks (voxel indices of the image as stored); a no-op when
    ``enabled`` is false."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        clicks: object = None,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.clicks = parse_clicks(clicks, "foreground").numpy()
        self.enabled = bool(enabled)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            mask = d[key]
            if mask.shape[0] != 1:
                raise ValueError(f"{key!r} must be a one-channel mask to number its lesions, got {list(mask.shape)}")
            values = click_instances(
                np.asarray(mask[0].detach().cpu() if torch.is_tensor(mask) else mask[0]), self.clicks
            )
            out = torch.as_tensor(values[None])
            d[key] = (
                MetaTensor(out, meta=mask.meta, applied_operations=mask.applied_operations)
                if isinstance(mask, MetaTensor)
                else out
            )
        return d
