"""LiTS (Liver Tumor Segmentation benchmark) layout: a datalist builder and a small synthetic writer for tests.

The official LiTS training data is a flat folder of ``volume-<N>.nii`` images and ``segmentation-<N>.nii`` label maps
(0 background, 1 liver, 2 tumour); the two official download batches may be kept as two subfolders of one folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LITS_TUMOUR_LABEL", "lits_datalist", "make_lits_like"]

PathLike = str | os.PathLike

LITS_TUMOUR_LABEL = 2  # 0 background, 1 liver, 2 tumour
_LAYOUT = "LiTS layout <dataset_dir>/volume-<N>.nii + segmentation-<N>.nii (optionally in batch subfolders)"
_VOLUME = re.compile(r"^volume-(?P<index>\d+)\.nii(\.gz)?$")


def _volumes(folder: Path) -> list[tuple[int, Path]]:
    """Return ``(index, path)`` of every ``volume-<N>.nii[.gz]`` directly inside a folder."""
    found = []
    for path in folder.iterdir():
        match = _VOLUME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group("index")), path))
    return found


def _segmentation_for(volume: Path, index: int) -> Path | None:
    """Return the label map next to a volume (``segmentation-<N>.nii``, else ``.nii.gz``), or None."""
    for suffix in (".nii", ".nii.gz"):
        candidate = volume.parent / f"segmentation-{index}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def lits_datalist(dataset_dir: PathLike, require_label: bool = True) -> list[dict[str, str]]:
    """List LiTS cases ``volume-<N>.nii`` + ``segmentation-<N>.nii`` sorted by N; cases are named ``volume-<N>``."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder {str(root)!r} does not exist or is not a folder; expected the {_LAYOUT}"
        )
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    volumes: dict[int, Path] = {}
    for folder in folders:
        for index, path in _volumes(folder):
            if index in volumes:
                raise ValueError(f"LiTS case volume-{index} is found twice: {volumes[index]} and {path}")
            volumes[index] = path
    if not volumes:
        raise FileNotFoundError(f"no volume-<N>.nii files found in {str(root)!r}; expected the {_LAYOUT}")
    datalist: list[dict[str, str]] = []
    for index in sorted(volumes):
        label = _segmentation_for(volumes[index], index)
        if label is None and require_label:
            expected = volumes[index].parent / f"segmentation-{index}.nii"
            raise FileNotFoundError(f"LiTS case volume-{index} has no label: expected {expected}")
        item = {"image": str(volumes[index]), "case": f"volume-{index}"}
        if label is not None:
            item["label"] = str(label)
        datalist.append(item)
    return datalist


def make_lits_like(
    out_dir: PathLike,
    num_cases: int = 4,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Sequence[float] = (0.8, 0.8, 1.5),
    seed: int = 0,
    compressed: bool = False,
) -> list[str]:
    """Write LiTS-layout cases ``volume-<N>.nii`` + ``segmentation-<N>.nii`` (CT HU; 1 liver-like organ, 2 tumour)."""
    import nibabel as nib  # lazy: the datalist builder above needs no imaging library

    from .synthetic import make_imagestr_like

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if compressed else ".nii"
    staging = Path(tempfile.mkdtemp(prefix=".lits-staging-", dir=root))
    try:
        cases = make_imagestr_like(
            staging,
            num_cases=num_cases,
            channel_suffix=False,
            tumour_label=LITS_TUMOUR_LABEL,
            shape=shape,
            spacing=spacing,
            seed=seed,
            prefix="case",
        )
        written = []
        for index, case in enumerate(cases):
            nib.save(nib.load(str(staging / "imagesTr" / f"{case}.nii.gz")), str(root / f"volume-{index}{suffix}"))
            nib.save(
                nib.load(str(staging / "labelsTr" / f"{case}.nii.gz")), str(root / f"segmentation-{index}{suffix}")
            )
            written.append(f"volume-{index}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
