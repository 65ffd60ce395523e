"""Case ids for per-case reports: from a sample's ``case`` key, else its image file name without the image suffix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".npy", ".npz", ".dcm", ".png", ".tif", ".tiff")


def case_id_from_path(path: str | os.PathLike) -> str:
    """Return the file name of ``path`` without its image extension, so CSV rows read ``case_00001``, not a path."""
    name = Path(str(path)).name
    lower = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _ids_from_sample(sample: Any, case_key: str, image_key: str) -> str | None:
    """Read the case id of one decollated sample dict (explicit key first, then the image file name)."""
    if not isinstance(sample, dict):
        return None
    if case_key in sample and sample[case_key] is not None:
        value = sample[case_key]
        return str(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
    image = sample.get(image_key)
    filename = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    if filename is None and isinstance(sample.get(f"{image_key}_meta_dict"), dict):
        filename = sample[f"{image_key}_meta_dict"].get("filename_or_obj")
    if isinstance(filename, (list, tuple)):
        filename = filename[0] if len(filename) == 1 else None
    return case_id_from_path(filename) if filename else None


def case_ids_from_data(data: Any, case_key: str = "case", image_key: str = "image") -> list[str | None] | None:
    """Return the case ids of a batched dict or a decollated list of dicts (None where unknown), for the CSV rows.

    An explicit ``case_key`` entry wins; otherwise the id is the file name (without extension) found in
    ``data[image_key].meta["filename_or_obj"]`` (or the legacy ``{image_key}_meta_dict``).
    """
    if isinstance(data, (list, tuple)):
        return [_ids_from_sample(sample, case_key, image_key) for sample in data]
    if not isinstance(data, dict):
        return None
    values: Any = None
    if case_key in data and data[case_key] is not None:
        values = data[case_key]
        if isinstance(values, torch.Tensor):
            values = values.reshape(-1).tolist()
        values = [values] if isinstance(values, (str, int)) else list(values)
        return [None if v is None else str(v) for v in values]
    image = data.get(image_key)
    if isinstance(image, MetaTensor):
        values = image.meta.get("filename_or_obj")
    if values is None and isinstance(data.get(f"{image_key}_meta_dict"), dict):
        values = data[f"{image_key}_meta_dict"].get("filename_or_obj")
    if values is None:
        return None
    values = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    return [case_id_from_path(v) if v else None for v in values]
