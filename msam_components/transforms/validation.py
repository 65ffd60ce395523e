"""Input checks that turn messy real data into clear errors naming the file at fault, before any training step."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform


def _source(data: Mapping[Hashable, object], key: Hashable) -> str:
    value = data[key]
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", key))
    return str(key)


class ValidateVolumesd(MapTransform):
    """Check freshly loaded (channel-first) volumes: one channel, 3-D, finite; image and label on the same grid.

    Put it right after ``LoadImaged(ensure_channel_first=True)``. Errors name the file and the offending property, so a
    bad case in a large dataset is found at once rather than as an obscure shape error deep inside the network.
    ``label_key`` (optional) must have the image's spatial shape and an affine within ``affine_atol`` (mm).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str | None = "label",
        affine_atol: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.affine_atol = affine_atol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img, name = d[key], _source(d, key)
            if img.ndim != 4 or img.shape[0] != 1:
                spatial = list(img.shape[1:]) if img.ndim >= 1 else []
                raise ValueError(
                    f"{name}: expected a single 3-D volume, got {img.ndim - 1}-D data with {img.shape[0]} channel(s) "
                    f"(shape {list(img.shape)}, spatial {spatial}); give one modality / one time point per file"
                )
            if img.is_floating_point():
                bad = int((~torch.isfinite(img)).sum())
                if bad:
                    raise ValueError(f"{name}: {bad} voxel(s) are NaN or infinite; fix or mask them before training")
        label_key = self.label_key
        if label_key is not None and label_key in d:
            for key in self.key_iterator(d):
                if key == label_key:
                    continue
                img, lab = d[key], d[label_key]
                if tuple(img.shape[1:]) != tuple(lab.shape[1:]):
                    raise ValueError(
                        f"image {_source(d, key)} and label {_source(d, label_key)} have different shapes: "
                        f"{list(img.shape[1:])} vs {list(lab.shape[1:])}"
                    )
                if isinstance(img, MetaTensor) and isinstance(lab, MetaTensor):
                    a, b = img.affine.double().numpy(), lab.affine.double().numpy()
                    if not np.allclose(a, b, atol=self.affine_atol):
                        raise ValueError(
                            f"image {_source(d, key)} and label {_source(d, label_key)} have different affines "
                            f"(max difference {np.abs(a - b).max():.4g}): they are not on the same voxel grid"
                        )
        return d
