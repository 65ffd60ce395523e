"""Input checks that turn messy real data into clear errors naming the file at fault, before any training step."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import MapTransform

logger = logging.getLogger("msam_components")
# Above this many distinct values a "label map" is an image or noise, not class ids (KiTS19 has 3, BraTS 4).
MAX_LABEL_VALUES = 64
# About 4 GB of float32: no tumour volume at 1.5 mm comes near; a wrong voxel size in a header does.
MAX_RESAMPLED_VOXELS = 2**30


def _source(data: Mapping[Hashable, object], key: Hashable) -> str:
    value = data[key]
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", key))
    return str(key)


class ValidateVolumesd(MapTransform):
    """Check freshly loaded (channel-first) volumes: one channel, 3-D, finite; image and label on the same grid.

    Put it right after ``LoadImaged(ensure_channel_first=True)``. Errors name the file and the offending property, so a
    bad case in a large dataset is found at once rather than as an obscure shape error deep inside the network.
    ``label_key`` (optional) must have the image's spatial shape and an affine within ``affine_atol`` (mm), and hold
    class ids: integers >= 0, among ``label_values`` when given (the dataset's labels, e.g. KiTS19's 0, 1, 2).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str | None = "label",
        affine_atol: float = 1e-3,
        allow_missing_keys: bool = False,
        pixdim: Sequence[float] | None = None,
        max_voxels: int = MAX_RESAMPLED_VOXELS,
        max_label_values: int = MAX_LABEL_VALUES,
        label_name: str = "label",
        label_values: Sequence[int] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_values = None if label_values is None else sorted({int(v) for v in label_values})
        self.label_key = label_key
        self.label_name = label_name  # what errors call the label ("initial mask" for a mask to edit)
        self.affine_atol = affine_atol
        self.pixdim = None if pixdim is None else [float(p) for p in pixdim]
        self.max_voxels = int(max_voxels)
        self.max_label_values = int(max_label_values)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img, name = d[key], _source(d, key)
            if name.endswith((".nii", ".nii.gz")) and os.path.isfile(name):
                _check_header(name, nib.load(name))  # the stored header, as MONAI's reader may have corrected it
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
            if isinstance(img, MetaTensor):
                self._check_geometry(img, name)
            if key == self.label_key:
                self._check_label(img, name)
        label_key = self.label_key
        if label_key is not None and label_key in d:
            for key in self.key_iterator(d):
                if key == label_key:
                    continue
                img, lab = d[key], d[label_key]
                if tuple(img.shape[1:]) != tuple(lab.shape[1:]):
                    raise ValueError(
                        f"image {_source(d, key)} and {self.label_name} {_source(d, label_key)} have different shapes: "
                        f"{list(img.shape[1:])} vs {list(lab.shape[1:])}"
                    )
                if isinstance(img, MetaTensor) and isinstance(lab, MetaTensor):
                    a, b = img.affine.double().numpy(), lab.affine.double().numpy()
                    if not np.allclose(a, b, atol=self.affine_atol):
                        raise ValueError(
                            f"image {_source(d, key)} and {self.label_name} {_source(d, label_key)} have different affines "
                            f"(max difference {np.abs(a - b).max():.4g}): they are not on the same voxel grid"
                        )
        return d

    def _check_geometry(self, img: MetaTensor, name: str) -> None:
        """A header affine with NaN/Inf (else a silent identity grid), and a resampled size that cannot be allocated."""
        for what, affine in (("affine", img.affine), ("original affine", img.meta.get("original_affine"))):
            if affine is not None and not np.isfinite(np.asarray(affine, dtype=np.float64)).all():
                raise ValueError(
                    f"{name}: the header's {what} (sform/qform) holds NaN or infinite values, so the voxel grid is "
                    "unknown; fix the header (e.g. nibabel: img.set_sform(img.get_qform()))"
                )
        if self.pixdim is None:
            return
        spacing = np.linalg.norm(img.affine.double().numpy()[:3, :3], axis=0)
        shape = np.asarray(img.shape[1:], dtype=np.float64)
        resampled = np.ceil(shape * spacing / np.asarray(self.pixdim, dtype=np.float64))
        voxels = float(np.prod(resampled))
        if voxels > self.max_voxels:
            raise ValueError(
                f"{name}: resampling its {[int(v) for v in shape]} voxels of {spacing.round(3).tolist()} mm to "
                f"{self.pixdim} mm would give {[int(v) for v in resampled]} = {voxels:.3g} voxels "
                f"({voxels * 4 / 1e9:.3g} GB as float32), more than max_voxels {self.max_voxels}; check the voxel size "
                "in the header"
            )

    def _check_label(self, lab: torch.Tensor, name: str) -> None:
        """Refuse label maps that are not class ids: non-integer values (a tumour stored as 1.5) or too many values."""
        values = torch.unique(lab)
        if len(values) and float(values[0]) < 0:
            raise ValueError(
                f"{self.label_name} {name}: holds negative values such as {float(values[0]):g}; a label map holds "
                "class ids >= 0 (0 = background)"
            )
        if lab.is_floating_point():
            fractional = values[values != torch.round(values)]
            if len(fractional):
                raise ValueError(
                    f"{self.label_name} {name}: holds non-integer values such as {float(fractional[0]):g} "
                    f"({len(fractional)} distinct); a label map must hold integer class ids (e.g. tumour 2), "
                    "so these voxels would match no target label"
                )
        if len(values) > self.max_label_values:
            raise ValueError(
                f"{self.label_name} {name}: has {len(values)} distinct values (from {float(values[0]):g} to "
                f"{float(values[-1]):g}), more than max_label_values {self.max_label_values}: this looks like an "
                "image or noise, not a segmentation"
            )

        if self.label_values is not None:
            unknown = [v for v in values.tolist() if float(v).is_integer() and int(v) not in self.label_values]
            if unknown:
                raise ValueError(
                    f"{self.label_name} {name}: holds values {[int(v) for v in unknown[:5]]} that are not labels of "
                    f"this dataset (label_values {self.label_values}); check that the segmentation belongs to it"
                )


class NamedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` whose read errors name the file (a truncated .nii.gz otherwise gives a bare EOFError)."""

    def read(self, data: object, **kwargs: object) -> object:
        """Read the header(s); a failure is re-raised naming the file."""
        try:
            return super().read(data, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise _read_error(data, err) from err

    def get_data(self, img: object) -> tuple[np.ndarray, dict]:
        """Read the voxel data; a truncated or corrupt file is re-raised naming the file."""
        try:
            return super().get_data(img)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise _read_error(self.filenames, err) from err


def _check_header(name: str, img: object) -> None:
    """Refuse a NIfTI whose declared sform or qform holds NaN/Inf, or whose shape has a zero-size dimension.

    MONAI's reader replaces an affine with NaN/Inf in its 3x3 part by one made from the voxel sizes, without a word
    (the image then lands on an invented grid), and turns an empty dimension into a shapeless array, so the header as
    stored is checked here.
    """
    header = getattr(img, "header", None)
    if header is None or not hasattr(header, "get_sform"):
        return
    shape = [int(s) for s in img.shape]
    if any(s == 0 for s in shape):
        raise ValueError(f"{name}: the volume has shape {shape}, with a zero-size dimension: it holds no voxels")
    transforms = {"sform": (int(header["sform_code"]), header.get_sform)}
    transforms["qform"] = (int(header["qform_code"]), header.get_qform)
    for what, (code, get) in transforms.items():
        if code > 0 and not np.isfinite(np.asarray(get(), dtype=np.float64)).all():
            raise ValueError(
                f"{name}: the header's {what} holds NaN or infinite values, so the voxel grid is unknown; fix the "
                f"header (e.g. nibabel: img.set_{what}(...))"
            )


def _read_error(files: object, err: BaseException) -> OSError:
    """An ``OSError`` naming the file(s) that failed to read and why, in words for truncated gzip data."""
    names = ", ".join(map(str, files)) if isinstance(files, (list, tuple)) else str(files)
    if isinstance(err, EOFError):
        reason = "the compressed data ends early: the file is truncated (an interrupted copy or download?)"
    else:
        reason = f"{type(err).__name__}: {err}"
    return OSError(f"cannot read {names}: {reason}")


class WarnEmptyMaskd(MapTransform):
    """Log a warning naming the input when a predicted mask has no foreground voxel (else an empty file looks fine)."""

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not bool((d[key] > 0).any()):
                source = _source(d, self.source_key) if self.source_key in d else _source(d, key)
                logger.warning(
                    f"the predicted mask for {source} is empty (no voxel above the threshold): check that the "
                    "foreground click lies on the lesion and that the weights fit this task"
                )
        return d


class WarnIfNotHounsfieldd(MapTransform):
    """Warn, naming the file, when a CT's intensities do not look like Hounsfield units (air about -1000 HU).

    The CT preprocessing clips to a HU window; data stored without its rescale intercept (0..4095) or already
    normalised (0..1) passes silently and gives meaningless inputs. Warns when the minimum is above ``min_air`` (no air
    or background below it) or the range is narrower than ``min_range``.
    """

    def __init__(
        self, keys: KeysCollection, min_air: float = -500.0, min_range: float = 500.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_air, self.min_range = float(min_air), float(min_range)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            low, high = float(d[key].min()), float(d[key].max())
            if low > self.min_air or high - low < self.min_range:
                logger.warning(
                    f"{_source(d, key)}: intensities range from {low:g} to {high:g}, which does not look like "
                    f"Hounsfield units (air about -1000, soft tissue 0 to 100); check the rescale slope/intercept, "
                    "or use an MR bundle for MR images"
                )
        return d
