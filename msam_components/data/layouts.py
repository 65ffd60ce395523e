"""Datalist builders for the official dataset layouts (KiTS19, BraTS 2021, MSD, nnU-Net-like) and a case-level split.

Every builder returns a list of dicts ``{"image": str | list[str], "label": str, "case": str}`` sorted by case id, the
format that MONAI's ``LoadImaged`` and ``Dataset`` consume. Errors name the folder or file at fault and the layout that
was expected, so that a wrong ``dataset_dir`` in a bundle config is easy to diagnose.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write

__all__ = [
    "DEFAULT_TARGET_LABELS",
    "NIFTI_SUFFIXES",
    "brats21_datalist",
    "case_output_name",
    "default_target_labels",
    "imagestr_labelstr_datalist",
    "kits19_datalist",
    "msd_datalist",
    "msd_target_labels",
    "split_datalist",
]

PathLike = str | os.PathLike

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

# Label values that form the segmentation target ("the tumour") for each layout's official label convention.
DEFAULT_TARGET_LABELS: dict[str, tuple[int, ...]] = {
    "kits19": (2,),  # 0 background, 1 kidney, 2 tumour
    "kits19_kidney_and_tumour": (1, 2),
    "brats21": (1, 2, 4),  # whole tumour: 1 necrotic/non-enhancing core, 2 edema, 4 enhancing tumour
    "brats21_tumour_core": (1, 4),
    "brats21_enhancing_tumour": (4,),
}

_KITS19_LAYOUT = "KiTS19 layout <dataset_dir>/case_XXXXX/imaging.nii.gz (+ segmentation.nii.gz)"
_BRATS21_LAYOUT = "BraTS 2021 layout <dataset_dir>/<case>/<case>_<modality>.nii.gz (+ <case>_seg.nii.gz)"
_IMAGESTR_LAYOUT = (
    "nnU-Net-like layout <dataset_dir>/{image_dir}/<case>[_0000].nii.gz + <dataset_dir>/{label_dir}/<case>.nii.gz"
)
_MSD_TUMOUR_WORDS = ("tumour", "tumor", "cancer", "lesion", "mass", "neoplasm", "metasta", "edema", "oedema")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def default_target_labels(layout: str) -> list[int]:
    """Return the label values that make up the tumour target for a named layout (e.g. 'kits19' -> [2])."""
    key = layout.lower()
    if key not in DEFAULT_TARGET_LABELS:
        hint = " (for MSD tasks use msd_target_labels(dataset_json))" if key == "msd" else ""
        raise KeyError(f"no default target labels for layout {layout!r}{hint}; known: {sorted(DEFAULT_TARGET_LABELS)}")
    return list(DEFAULT_TARGET_LABELS[key])


# Layouts whose image file has the same name in every case folder: outputs are named after the folder instead.
CASE_FOLDER_IMAGE_STEMS: tuple[str, ...] = ("imaging",)  # KiTS19: case_XXXXX/imaging.nii.gz


def case_output_name(metadict: dict | None, saver: object) -> dict:
    """``SaveImaged`` name formatter: ``case_00123_seg.nii.gz`` for ``case_00123/imaging.nii.gz``, else MONAI's default.

    With MONAI's default every KiTS19 case becomes ``imaging_seg.nii.gz``, so several cases written to one folder
    silently overwrite each other.
    """
    from monai.data.folder_layout import default_name_formatter

    kwargs = default_name_formatter(metadict, saver)
    path = Path(kwargs["subject"])
    if _strip_nifti(path.name) in CASE_FOLDER_IMAGE_STEMS and path.parent.name:
        kwargs["subject"] = path.parent.name
    return kwargs


def _strip_nifti(name: str) -> str | None:
    """Return the file name without its NIfTI suffix, or None when it is not a NIfTI file."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _find_nifti(folder: Path, stem: str) -> Path | None:
    """Return the existing ``folder/stem.nii.gz`` (preferred) or ``folder/stem.nii``, else None."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _require_dir(folder: Path, layout: str) -> Path:
    """Fail with the expected layout when the dataset folder is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset folder {str(folder)!r} does not exist or is not a folder; expected the {layout}"
        )
    return folder


def _subdirs(folder: Path) -> list[Path]:
    """Return the non-hidden subfolders of a folder, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def kits19_datalist(dataset_dir: PathLike, require_label: bool = True) -> list[dict[str, str]]:
    """List KiTS19 cases (``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``); image-only cases only on request."""
    root = _require_dir(Path(dataset_dir), _KITS19_LAYOUT)
    case_dirs = [d for d in _subdirs(root) if d.name.startswith("case_")]
    if not case_dirs:
        raise FileNotFoundError(f"no 'case_*' folders found in {str(root)!r}; expected the {_KITS19_LAYOUT}")
    datalist: list[dict[str, str]] = []
    for case_dir in case_dirs:
        image = _find_nifti(case_dir, "imaging")
        if image is None:
            raise FileNotFoundError(
                f"KiTS19 case {case_dir.name!r} has no image: expected {case_dir / 'imaging.nii.gz'}"
            )
        label = _find_nifti(case_dir, "segmentation")
        if label is None and require_label:
            continue  # KiTS19 test cases (210-299) ship without a segmentation
        item = {"image": str(image), "case": case_dir.name}
        if label is not None:
            item["label"] = str(label)
        datalist.append(item)
    if not datalist:
        raise FileNotFoundError(
            f"none of the {len(case_dirs)} KiTS19 cases in {str(root)!r} has a segmentation.nii.gz; "
            "pass require_label=False to list image-only cases for inference"
        )
    return datalist


def brats21_datalist(
    dataset_dir: PathLike, modality: str | Sequence[str] = "flair", label_suffix: str | None = "seg"
) -> list[dict[str, Any]]:
    """List BraTS 2021 cases ``<case>/<case>_<modality>.nii.gz``; a list of modalities gives a list of image paths."""
    root = _require_dir(Path(dataset_dir), _BRATS21_LAYOUT)
    modalities = [modality] if isinstance(modality, str) else list(modality)
    if not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise ValueError(f"modality must be a non-empty string or list of strings, got {modality!r}")
    case_dirs = [d for d in _subdirs(root) if any(_strip_nifti(f.name) for f in d.glob(f"{d.name}_*"))]
    if not case_dirs:
        raise FileNotFoundError(f"no BraTS case folders found in {str(root)!r}; expected the {_BRATS21_LAYOUT}")
    datalist: list[dict[str, Any]] = []
    for case_dir in case_dirs:
        case = case_dir.name
        images = []
        for mod in modalities:
            path = _find_nifti(case_dir, f"{case}_{mod}")
            if path is None:
                expected = case_dir / f"{case}_{mod}.nii.gz"
                raise FileNotFoundError(f"BraTS case {case!r} has no {mod!r} image: expected {expected}")
            images.append(str(path))
        item: dict[str, Any] = {"image": images[0] if isinstance(modality, str) else images, "case": case}
        if label_suffix is not None:
            label = _find_nifti(case_dir, f"{case}_{label_suffix}")
            if label is None:
                expected = case_dir / f"{case}_{label_suffix}.nii.gz"
                raise FileNotFoundError(f"BraTS case {case!r} has no {label_suffix!r} label: expected {expected}")
            item["label"] = str(label)
        datalist.append(item)
    return datalist


def _case_from_item(item: dict[str, Any]) -> str:
    """Derive a case id from a datalist item: the label file name (no channel suffix) or else the first image's."""
    path = item.get("label") or item["image"]
    name = Path(path if isinstance(path, str) else path[0]).name
    return _strip_nifti(name) or name


def _check_exists(item: dict[str, Any], key: str, source: Path) -> None:
    """Fail naming the datalist file when a path listed in it does not exist."""
    value = item.get(key)
    for path in [value] if isinstance(value, str) else list(value or []):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{key} file {path!r} listed in {str(source)!r} does not exist")


def msd_datalist(dataset_json: PathLike, section: str = "training") -> list[dict[str, Any]]:
    """List a Medical Segmentation Decathlon ``dataset.json`` section with paths resolved against the json's folder."""
    from monai.data import load_decathlon_datalist  # lazy: keeps the synthetic-data CLI free of the torch import

    source = Path(dataset_json)
    if source.is_dir():
        source = source / "dataset.json"
    if not source.is_file():
        raise FileNotFoundError(
            f"MSD dataset file {str(source)!r} does not exist; expected the Medical Segmentation Decathlon layout "
            "<task_dir>/dataset.json with imagesTr/ and labelsTr/"
        )
    with open(source, encoding="utf-8") as f:
        content = json.load(f)
    if not isinstance(content, dict) or section not in content:
        available = sorted(k for k, v in content.items() if isinstance(v, list)) if isinstance(content, dict) else []
        raise KeyError(f"MSD dataset file {str(source)!r} has no {section!r} section; available sections: {available}")
    if not content[section]:
        raise ValueError(f"section {section!r} of MSD dataset file {str(source)!r} is empty")
    datalist = load_decathlon_datalist(source, is_segmentation=True, data_list_key=section, base_dir=source.parent)
    for item in datalist:
        for key in ("image", "label"):
            if key in item:
                _check_exists(item, key, source)
        item["case"] = _case_from_item(item)
    cases = [item["case"] for item in datalist]
    if len(set(cases)) != len(cases):
        raise ValueError(f"section {section!r} of {str(source)!r} lists the same case more than once")
    return sorted(datalist, key=lambda item: item["case"])


def msd_target_labels(dataset_json: PathLike) -> list[int]:
    """Return the label values of an MSD task whose names denote a lesion (tumour, cancer, edema...) from ``labels``."""
    source = Path(dataset_json)
    if source.is_dir():
        source = source / "dataset.json"
    with open(source, encoding="utf-8") as f:
        labels = json.load(f).get("labels", {})
    found = sorted(int(k) for k, v in labels.items() if any(w in str(v).lower() for w in _MSD_TUMOUR_WORDS))
    if not found:
        raise ValueError(
            f"no tumour-like label names in 'labels' of {str(source)!r}: {labels}; pass the labels explicitly"
        )
    return found


def imagestr_labelstr_datalist(
    dataset_dir: PathLike, image_dir: str = "imagesTr", label_dir: str = "labelsTr", require_label: bool = True
) -> list[dict[str, Any]]:
    """List an nnU-Net-like ``imagesTr``/``labelsTr`` layout; image channel files ``x_0000`` pair with label ``x``."""
    layout = _IMAGESTR_LAYOUT.format(image_dir=image_dir, label_dir=label_dir)
    root = _require_dir(Path(dataset_dir), layout)
    images_root = root / image_dir
    labels_root = root / label_dir
    if not images_root.is_dir():
        raise FileNotFoundError(f"image folder {str(images_root)!r} does not exist; expected the {layout}")
    if require_label and not labels_root.is_dir():
        raise FileNotFoundError(f"label folder {str(labels_root)!r} does not exist; expected the {layout}")
    stems = sorted(s for f in images_root.iterdir() if not f.name.startswith(".") and (s := _strip_nifti(f.name)))
    if not stems:
        raise FileNotFoundError(f"no NIfTI images found in {str(images_root)!r}; expected the {layout}")
    # nnU-Net names every image file <case>_<4-digit channel>; only then is the suffix a channel index.
    channel_named = all(_CHANNEL_SUFFIX.match(s) for s in stems)
    groups: dict[str, list[tuple[str, str]]] = {}
    for stem in stems:
        case, channel = stem, ""
        match = _CHANNEL_SUFFIX.match(stem)
        if match and channel_named and _find_nifti(labels_root, stem) is None:
            case, channel = match.group("case"), match.group("channel")
        image = _find_nifti(images_root, stem)
        groups.setdefault(case, []).append((channel, str(image)))
    datalist: list[dict[str, Any]] = []
    for case in sorted(groups):
        channels = sorted(groups[case])
        item: dict[str, Any] = {"image": channels[0][1] if len(channels) == 1 else [p for _, p in channels]}
        item["case"] = case
        label = _find_nifti(labels_root, case)
        if label is not None:
            item["label"] = str(label)
        elif require_label:
            raise FileNotFoundError(
                f"case {case!r} (image {channels[0][1]}) has no label: expected {labels_root / (case + '.nii.gz')}"
            )
        datalist.append(item)
    return datalist


def _read_fold_file(fold_file: Path) -> tuple[list[str], list[str]]:
    """Read the train/validation case ids recorded in a fold file."""
    try:
        with open(fold_file, encoding="utf-8") as f:
            record = json.load(f)
        train, val = record["train"], record["validation"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"fold file {str(fold_file)!r} is not a valid split record with 'train' and 'validation' lists: {err}"
        ) from err
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ValueError(f"fold file {str(fold_file)!r} lists case {overlap[0]!r} in both train and validation")
    return [str(c) for c in train], [str(c) for c in val]


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Write JSON (indent 4) atomically, so readers never see half a fold file."""
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=4) + "\n"))


def split_datalist(
    datalist: Sequence[dict[str, Any]],
    val_fraction: float = 0.2,
    seed: int = 0,
    fold_file: PathLike | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a datalist by case id, deterministically for a seed, optionally recording/reusing the split in a file."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_case: dict[str, dict[str, Any]] = {}
    for item in datalist:
        case = str(item["case"])
        if case in by_case:
            raise ValueError(f"case {case!r} appears more than once in the datalist")
        by_case[case] = item
    cases = sorted(by_case)
    fold_path = Path(fold_file) if fold_file is not None else None
    if fold_path is not None and fold_path.exists():
        train_ids, val_ids = _read_fold_file(fold_path)
        for case in train_ids + val_ids:
            if case not in by_case:
                raise KeyError(
                    f"case {case!r} recorded in fold file {str(fold_path)!r} is not in the datalist any more"
                )
        new_cases = sorted(set(cases) - set(train_ids) - set(val_ids))
        if new_cases:
            warnings.warn(
                f"{len(new_cases)} case(s) not recorded in fold file {str(fold_path)!r} go to training: {new_cases}",
                stacklevel=2,
            )
            train_ids = train_ids + new_cases
    else:
        num_val = int(round(val_fraction * len(cases)))
        if val_fraction > 0 and len(cases) >= 2:
            num_val = min(max(num_val, 1), len(cases) - 1)
        order = np.random.default_rng(seed).permutation(len(cases))
        val_ids = sorted(cases[i] for i in order[:num_val])
        train_ids = sorted(cases[i] for i in order[num_val:])
        if fold_path is not None:
            record = {"seed": seed, "val_fraction": val_fraction, "train": train_ids, "validation": val_ids}
            _write_json_atomic(fold_path, record)
    train_set, val_set = set(train_ids), set(val_ids)
    train = [by_case[c] for c in cases if c in train_set]
    val = [by_case[c] for c in cases if c in val_set]
    return train, val


def dataset_json_or(builder: Any, dataset_dir: PathLike, **kwargs: Any) -> list[dict[str, Any]]:
    """Cases of ``dataset_dir``: from its MSD-style ``dataset.json`` if it has one, else from the official layout."""
    json_path = Path(dataset_dir) / "dataset.json"
    if json_path.is_file():
        return msd_datalist(json_path)
    return builder(dataset_dir, **kwargs)
