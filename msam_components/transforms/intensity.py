"""Intensity normalisation used by M-SAM's reference pipeline that MONAI has no ready transform for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


class NormalizeIntensityAboved(MapTransform):
    """Z-score every voxel with the mean and std of the voxels above ``threshold`` (reference: ``> 0`` after the CT clip).

    M-SAM's trainer normalises with ``tio.ZNormalization(masking_method=lambda x: x > 0)``; for clipped CT that takes the
    statistics of soft tissue only, which keeps tumour/organ contrast, unlike a z-score over the whole volume dominated
    by air. Here it is per image (the reference pooled the statistics over the batch). With no voxel above the
    threshold the whole image provides the statistics.
    """

    def __init__(self, keys: KeysCollection, threshold: float = 0.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            values = img[img > self.threshold]
            if values.numel() < 2:
                values = img.reshape(-1)
            mean, std = values.float().mean(), values.float().std()
            d[key] = (img - mean) / (std if std > 0 else 1.0)
        return d
