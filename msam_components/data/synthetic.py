"""Small synthetic tumour datasets in the official layouts (KiTS19, BraTS 2021, MSD, nnU-Net-like) for demos and tests.

Each case is generated from its own seeded generator (``seed``, case index), so a case's content does not depend on
how many cases are written. Run ``python -m msam_components.data.synthetic --layout kits19 --out DIR`` to write one.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = [
    "kits19_like_arrays",
    "large_lesion_ct_case",
    "make_brats21_like",
    "make_imagestr_like",
    "make_kits19_like",
    "make_msd_like",
    "main",
]

PathLike = str | os.PathLike
Shape = tuple[int, int, int]

# Relative intensities (before z-scoring in the brain) of brain, ventricles, edema, enhancing tumour and necrosis.
_BRATS_CONTRAST: dict[str, tuple[float, float, float, float, float]] = {
    "flair": (1.0, 0.3, 1.8, 1.6, 1.35),
    "t1": (1.0, 0.3, 0.8, 0.9, 0.6),
    "t1ce": (1.0, 0.4, 0.85, 2.0, 0.5),
    "t2": (1.0, 2.0, 1.8, 1.5, 2.0),
}


def _check_shape(shape: Sequence[int], minimum: int = 16) -> Shape:
    """Validate a 3D volume shape."""
    if len(shape) != 3 or any(int(s) < minimum for s in shape):
        raise ValueError(f"shape must be 3 sizes of at least {minimum} voxels, got {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _case_rng(seed: int, index: int) -> np.random.Generator:
    """Return the generator of one case, independent of the number of cases written."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng([seed, index])


def _ellipsoid(shape: Shape, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Return a boolean mask of an axis-aligned ellipsoid (voxel units)."""
    grids = np.ogrid[: shape[0], : shape[1], : shape[2]]
    dist = sum(((g - c) / max(r, 0.5)) ** 2 for g, c, r in zip(grids, centre, radii))
    return dist <= 1.0


def _blob(rng: np.random.Generator, shape: Shape, centre: np.ndarray, rmin: float, rmax: float) -> np.ndarray:
    """Return a random lumpy blob: the union of 2-3 ellipsoids with radii in [rmin, rmax] around a centre."""
    mask = np.zeros(shape, dtype=bool)
    for lobe in range(int(rng.integers(2, 4))):
        radii = rng.uniform(rmin, rmax, size=3)
        offset = np.zeros(3) if lobe == 0 else rng.uniform(-0.5, 0.5, size=3) * radii
        mask |= _ellipsoid(shape, centre + offset, radii)
    return mask


def _save_nifti(array: np.ndarray, path: Path, spacing: Sequence[float]) -> None:
    """Write a volume with a diagonal affine of the given spacing (mm)."""
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


# Hounsfield units of a contrast-enhanced abdominal CT (KiTS19 is a late-arterial/portal-venous phase): the kidney
# enhances more than a renal tumour, which lies between soft tissue and kidney; the look-alikes (unlabelled bowel loops
# and cysts) share the tumour's range, and the liver is close to it.
CT_HU: dict[str, tuple[float, float]] = {
    "fat": (-120.0, -80.0),
    "soft_tissue": (20.0, 60.0),
    "kidney": (150.0, 200.0),
    "tumour": (60.0, 110.0),
    "liver": (115.0, 135.0),
    "bone": (350.0, 550.0),
}
_DEFAULT_FOV_MM = 144.0  # the in-plane field of view of the default KiTS19-like case; sizes below scale with it


def _mm_grid(shape: Shape, spacing: Sequence[float]) -> list[np.ndarray]:
    """Open grid of voxel-centre coordinates in millimetres (broadcastable to ``shape``)."""
    return [g * float(s) for g, s in zip(np.ogrid[: shape[0], : shape[1], : shape[2]], spacing)]


def _ellipsoid_mm(grid: list[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid given in millimetres."""
    return sum(((g - c) / max(float(r), 0.5)) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _lumpy_mm(
    rng: np.random.Generator, grid: list[np.ndarray], shape: Shape, centre: np.ndarray, radius: float
) -> np.ndarray:
    """An irregular lesion of about ``radius`` mm: 2-4 overlapping ellipsoids with a lobulated, noisy outline."""
    dist = np.full(shape, np.inf)
    for lobe in range(int(rng.integers(2, 5))):
        radii = radius * rng.uniform(0.6, 1.0, size=3)
        offset = np.zeros(3) if lobe == 0 else rng.normal(size=3) * radius * 0.4
        dist = np.minimum(dist, sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre + offset, radii)))
    # a smooth random field (4^3 control points) bends the outline so that it is not a union of ellipsoids
    field = ndimage.zoom(rng.normal(size=(4, 4, 4)), [s / 4.0 for s in shape], order=1)
    return dist <= 1.0 + 0.3 * field[: shape[0], : shape[1], : shape[2]]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a mask (the mask itself when it is empty)."""
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return components == int(np.argmax(np.bincount(components.reshape(-1))[1:])) + 1


def _nested(inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """``inner`` clipped so that its 6-neighbourhood stays inside ``outer``; the deepest voxel of ``outer`` if empty."""
    nested = inner & ndimage.binary_erosion(outer)
    if nested.any() or not outer.any():
        return nested
    depth = ndimage.distance_transform_cdt(np.pad(outer, 1), metric="taxicab")[1:-1, 1:-1, 1:-1]
    if depth.max() < 2:
        return nested
    nested[np.unravel_index(int(np.argmax(depth)), depth.shape)] = True
    return nested


def _place_blobs(
    rng: np.random.Generator,
    grid: list[np.ndarray],
    shape: Shape,
    count: int,
    centres: Sequence[np.ndarray],
    radius_range: tuple[float, float],
    allowed: np.ndarray,
    taken: np.ndarray,
) -> list[np.ndarray]:
    """Draw ``count`` irregular blobs around the candidate centres, inside ``allowed``, each 2 voxels from the others."""
    blobs: list[np.ndarray] = []
    for _ in range(40 * max(count, 1)):
        if len(blobs) == count:
            break
        centre = np.asarray(centres[int(rng.integers(len(centres)))], dtype=float)
        blob = _largest_component(_lumpy_mm(rng, grid, shape, centre, rng.uniform(*radius_range)) & allowed)
        if blob.sum() < 8 or (ndimage.binary_dilation(blob, iterations=2) & taken).any():
            continue
        blobs.append(blob)
        taken = taken | blob
    return blobs


def _ct_case(
    rng: np.random.Generator,
    shape: Shape,
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    num_lesions: tuple[int, int] = (2, 4),
    num_mimics: tuple[int, int] = (1, 3),
) -> tuple[np.ndarray, np.ndarray]:
    """Return a contrast CT-like volume (int16 HU) and its labels (uint8: 1 kidney, 2 tumour).

    Several irregular tumours grow out of the kidneys (some also touching the liver, of similar density), and
    unlabelled look-alikes of tumour density lie elsewhere in the abdomen, so one click cannot segment a case and a
    model has to follow the clicks to tell a tumour from a look-alike. All tumours of a case lie within about 110 mm
    (at the default size) so that a 128-voxel window at 1.5 mm, or 64 voxels at 2 mm, holds them.
    """
    grid = _mm_grid(shape, spacing)
    fov = np.array(shape, dtype=float) * np.asarray(spacing, dtype=float)
    scale = min(fov[0], fov[1]) / _DEFAULT_FOV_MM
    centre = fov / 2.0 + rng.uniform(-0.03, 0.03, size=3) * fov
    body_radii = np.array([0.46 * fov[0], 0.4 * fov[1], fov[2]])
    body = _ellipsoid_mm(grid, centre, body_radii)
    inner = _ellipsoid_mm(grid, centre, body_radii - np.array([8.0, 8.0, 0.0]) * scale)  # under subcutaneous fat
    spine = _ellipsoid_mm(grid, centre + [0.0, 0.25 * fov[1], 0.0], [10.0 * scale, 10.0 * scale, fov[2]]) & body
    kidney_radii = np.array([22.0, 18.0, 48.0]) * scale * rng.uniform(0.9, 1.1, size=3)
    kidney_centres = [
        centre + np.array([side * 0.19 * fov[0], 0.1 * fov[1], 0.0]) + rng.uniform(-3, 3, size=3) * scale
        for side in (-1.0, 1.0)
    ]
    kidneys = np.zeros(shape, dtype=bool)
    perirenal = np.zeros(shape, dtype=bool)
    for kc in kidney_centres:
        kidneys |= _ellipsoid_mm(grid, kc, kidney_radii)
        perirenal |= _ellipsoid_mm(grid, kc, kidney_radii + 6.0 * scale)
    kidneys &= inner
    liver_centre = kidney_centres[0] + np.array([-6.0, -0.22 * fov[1], -0.25 * fov[2]]) * np.array([scale, 1, 1])
    liver = _ellipsoid_mm(grid, liver_centre, np.array([40.0, 30.0, 45.0]) * scale) & inner & ~perirenal
    # tumours: centred on a kidney's surface, bulging out; some of them reach the liver
    surface = []
    for kc in kidney_centres:
        for _ in range(12):
            direction = rng.normal(size=3) * np.array([1.0, 1.0, 0.5])
            direction /= np.linalg.norm(direction)
            surface.append(kc + direction * kidney_radii * rng.uniform(0.7, 1.0))
    lesion_count = int(rng.integers(num_lesions[0], num_lesions[1] + 1))
    # tumours of one case stay within a box of about 110 mm (scaled), so that one model window can hold them all
    box_centre = centre + np.array([0.0, 0.1 * fov[1], 0.0])
    keep = np.ones(shape, dtype=bool)
    for g, c in zip(grid, box_centre):
        keep &= np.abs(g - c) <= 52.0 * scale
    lesions = _place_blobs(
        rng, grid, shape, lesion_count, surface, (12.0 * scale, 22.0 * scale), inner & ~spine & keep, spine.copy()
    )
    tumour = np.zeros(shape, dtype=bool)
    for blob in lesions:
        tumour |= blob
    # look-alikes: unlabelled tumour-density blobs (bowel loops, complex cysts) in the abdomen, away from the tumours
    anterior = [
        centre
        + np.array(
            [rng.uniform(-0.3, 0.3) * fov[0], rng.uniform(-0.25, 0.05) * fov[1], rng.uniform(-0.2, 0.2) * fov[2]]
        )
        for _ in range(12)
    ]
    mimic_count = int(rng.integers(num_mimics[0], num_mimics[1] + 1))
    mimics = _place_blobs(
        rng,
        grid,
        shape,
        mimic_count,
        anterior,
        (9.0 * scale, 16.0 * scale),
        inner & ~kidneys & ~spine & keep,
        tumour | kidneys,
    )
    seg = np.zeros(shape, dtype=np.uint8)
    seg[kidneys] = 1
    seg[tumour] = 2

    def draw(tissue: str) -> float:
        return float(rng.uniform(*CT_HU[tissue]))

    hu = np.full(shape, -1000.0)
    hu[body] = draw("fat")
    hu[inner] = draw("soft_tissue")
    hu[perirenal & inner] = draw("fat")
    hu[liver] = draw("liver")
    hu[spine] = draw("bone")
    hu[kidneys] = draw("kidney")
    for blob in lesions + mimics:  # each tumour and look-alike has its own density within the tumour range
        hu[blob] = draw("tumour")
    hu += rng.normal(0.0, 12.0, size=shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), seg


def _glioma(
    rng: np.random.Generator, grid: list[np.ndarray], shape: Shape, centre: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One glioma of about ``radius`` mm: irregular oedema around an enhancing core around necrosis (nested masks)."""
    oedema = _lumpy_mm(rng, grid, shape, centre, radius)
    core = _lumpy_mm(rng, grid, shape, centre, radius * rng.uniform(0.4, 0.55)) & oedema
    necrosis = _ellipsoid_mm(grid, centre, [radius * rng.uniform(0.15, 0.25)] * 3) & core
    core |= ndimage.binary_dilation(necrosis)
    oedema |= ndimage.binary_dilation(core)
    return oedema, core, necrosis


def _brats_case(
    rng: np.random.Generator,
    shape: Shape,
    modalities: Sequence[str],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    num_lesions: tuple[int, int] = (1, 3),
    num_mimics: tuple[int, int] = (1, 2),
) -> tuple[dict, np.ndarray]:
    """Return z-scored MR-like volumes per modality and BraTS labels (2 oedema around 4 enhancing around 1 necrosis).

    A case holds one to three irregular gliomas (multifocal disease) and one or two unlabelled look-alikes that are as
    bright as oedema on FLAIR and T2 but do not enhance (white-matter hyperintensities), so the whole tumour cannot be
    told from them on FLAIR alone and clicks have to say which is which.
    """
    grid = _mm_grid(shape, spacing)
    fov = np.array(shape, dtype=float) * np.asarray(spacing, dtype=float)
    scale = min(fov) / 64.0
    centre = fov / 2.0
    brain_radii = fov * np.array([0.42, 0.45, 0.4])
    brain = _ellipsoid_mm(grid, centre, brain_radii)
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        ventricles |= _ellipsoid_mm(grid, centre + fov * [side * 0.06, -0.02, 0.02], fov * np.array([0.04, 0.12, 0.06]))
    inside = _ellipsoid_mm(grid, centre, brain_radii - 3.0 * scale) & ~ventricles
    candidates = []
    for _ in range(16):
        direction = rng.normal(size=3)
        candidates.append(centre + direction / np.linalg.norm(direction) * rng.uniform(0.2, 0.6) * brain_radii)
    count = int(rng.integers(num_lesions[0], num_lesions[1] + 1))
    seg = np.zeros(shape, dtype=np.uint8)
    taken = np.zeros(shape, dtype=bool)  # gliomas may abut the ventricles, not each other
    placed = 0
    for _ in range(60):
        if placed == count:
            break
        lesion_centre = np.asarray(candidates[int(rng.integers(len(candidates)))])
        oedema, core, necrosis = _glioma(rng, grid, shape, lesion_centre, rng.uniform(6.0, 11.0) * scale)
        oedema = _largest_component(oedema & inside)
        if oedema.sum() < 8 or (ndimage.binary_dilation(oedema, iterations=2) & taken).any():
            continue
        # keep the nesting on the voxel grid after clipping to the brain: necrosis wrapped in enhancing tumour, the
        # tumour core wrapped in oedema
        core = _nested(core, oedema)
        necrosis = _nested(necrosis, core)
        seg[oedema] = 2
        seg[core & oedema] = 4
        seg[necrosis & oedema] = 1
        taken |= oedema
        placed += 1
    mimic_count = int(rng.integers(num_mimics[0], num_mimics[1] + 1))
    mimics = _place_blobs(rng, grid, shape, mimic_count, candidates, (3.0 * scale, 6.0 * scale), inside, taken)
    mimic = np.zeros(shape, dtype=bool)
    for blob in mimics:
        mimic |= blob
    volumes = {}
    for mod in modalities:
        if mod not in _BRATS_CONTRAST:
            raise ValueError(f"unknown BraTS modality {mod!r}; choose from {sorted(_BRATS_CONTRAST)}")
        tissue, ventricle, oedema_level, enhancing, necrotic = _BRATS_CONTRAST[mod]
        img = np.full(shape, tissue)
        img[ventricles] = ventricle
        img[seg == 2], img[seg == 4], img[seg == 1] = oedema_level, enhancing, necrotic
        img[mimic] = oedema_level if mod in ("flair", "t2") else tissue * 1.05
        img *= rng.uniform(0.9, 1.1)
        img += rng.normal(0.0, 0.08, size=shape)
        inside_values = img[brain]
        volumes[mod] = np.where(brain, (img - inside_values.mean()) / inside_values.std(), 0.0).astype(np.float32)
    return volumes, seg


def large_lesion_ct_case(
    seed: int,
    shape: Sequence[int] = (96, 96, 104),
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    length_mm: float = 190.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A KiTS19-like CT (int16 HU, labels 1 kidney 2 tumour) with ONE irregular tumour about ``length_mm`` long,
    running from beside a kidney along the body axis: longer than a model window, for the large-lesion benchmark.

    The anatomy, look-alikes and intensities are those of :func:`make_kits19_like`'s cases (without their tumours).
    """
    shape = _check_shape(shape)
    rng = _case_rng(seed, 0)
    image, seg = _ct_case(rng, shape, spacing, num_lesions=(0, 0))
    grid = _mm_grid(shape, spacing)
    kidney = np.argwhere(seg == 1) * np.asarray(spacing, dtype=float)
    middle = kidney.mean(0)
    one_side = kidney[:, 0] < middle[0] if rng.random() < 0.5 else kidney[:, 0] >= middle[0]
    start = kidney[one_side].mean(0) + np.array([14.0, 0.0, -length_mm / 2.0])
    tumour = np.zeros(shape, dtype=bool)
    for z in np.arange(0.0, length_mm, 12.0):  # a chain of overlapping lumpy lobes
        centre = start + np.array([rng.normal(0.0, 3.0), rng.normal(0.0, 3.0), z])
        tumour |= _lumpy_mm(rng, grid, shape, centre, rng.uniform(16.0, 22.0))
    tumour = _largest_component(tumour & ndimage.binary_erosion(image > -500, iterations=6))
    hu = image.astype(float)
    hu[tumour] = rng.uniform(*CT_HU["tumour"]) + rng.normal(0.0, 12.0, size=int(tumour.sum()))
    seg[tumour] = 2
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), seg


def kits19_like_arrays(
    seed: int = 0, index: int = 0, shape: Sequence[int] = (96, 96, 64), spacing: Sequence[float] = (1.5, 1.5, 2.5)
) -> tuple[np.ndarray, np.ndarray]:
    """One case of :func:`make_kits19_like` in memory: CT HU (int16) and labels (uint8: 1 kidney, 2 tumour).

    ``make_kits19_like(..., seed=seed)`` writes this same case as ``case_{index:05d}``.
    """
    return _ct_case(_case_rng(seed, index), _check_shape(shape), spacing)


def make_kits19_like(
    out_dir: PathLike,
    num_cases: int = 8,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    seed: int = 0,
) -> list[str]:
    """Write KiTS19-layout cases ``case_XXXXX/{imaging,segmentation}.nii.gz`` (CT HU, labels 1 kidney 2 tumour)."""
    shape = _check_shape(shape)
    root = Path(out_dir)
    cases = []
    for index in range(num_cases):
        case = f"case_{index:05d}"
        image, seg = _ct_case(_case_rng(seed, index), shape, spacing)
        _save_nifti(image, root / case / "imaging.nii.gz", spacing)
        _save_nifti(seg, root / case / "segmentation.nii.gz", spacing)
        cases.append(case)
    return cases


def make_brats21_like(
    out_dir: PathLike,
    num_cases: int = 4,
    shape: Sequence[int] = (80, 80, 64),
    modalities: Sequence[str] = ("flair", "t1ce"),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[str]:
    """Write BraTS 2021-layout cases ``BraTS2021_XXXXX/BraTS2021_XXXXX_<mod>.nii.gz`` + ``_seg`` (labels 0,1,2,4)."""
    shape = _check_shape(shape)
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    root = Path(out_dir)
    cases = []
    for index in range(num_cases):
        case = f"BraTS2021_{index:05d}"
        volumes, seg = _brats_case(_case_rng(seed, index), shape, modalities, spacing)
        for mod, volume in volumes.items():
            _save_nifti(volume, root / case / f"{case}_{mod}.nii.gz", spacing)
        _save_nifti(seg, root / case / f"{case}_seg.nii.gz", spacing)
        cases.append(case)
    return cases


def _msd_labels(seg: np.ndarray, tumour_label: int) -> np.ndarray:
    """Map generator labels (1 organ, 2 tumour) to an MSD task's labels; the organ is dropped when the tumour is 1."""
    out = np.zeros_like(seg)
    if tumour_label != 1:
        out[seg == 1] = 1
    out[seg == 2] = tumour_label
    return out


def make_msd_like(
    out_dir: PathLike,
    num_cases: int = 4,
    num_test: int = 1,
    tumour_label: int = 2,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Sequence[float] = (1.0, 1.0, 1.5),
    seed: int = 0,
    prefix: str = "synth",
) -> list[str]:
    """Write an MSD task folder (imagesTr, labelsTr, imagesTs, dataset.json); returns the training case ids."""
    if not 1 <= tumour_label <= 255:
        raise ValueError(f"tumour_label must be in 1..255, got {tumour_label}")
    shape = _check_shape(shape)
    root = Path(out_dir)
    training, test, cases = [], [], []
    for index in range(num_cases + num_test):
        case = f"{prefix}_{index}"
        image, seg = _ct_case(_case_rng(seed, index), shape, spacing)
        if index < num_cases:
            _save_nifti(image, root / "imagesTr" / f"{case}.nii.gz", spacing)
            _save_nifti(_msd_labels(seg, tumour_label), root / "labelsTr" / f"{case}.nii.gz", spacing)
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            cases.append(case)
        else:
            _save_nifti(image, root / "imagesTs" / f"{case}.nii.gz", spacing)
            test.append(f"./imagesTs/{case}.nii.gz")
    labels = {"0": "background"}
    if tumour_label != 1:
        labels["1"] = "organ"
    labels[str(tumour_label)] = "tumour"
    dataset = {
        "name": "Synthetic",
        "description": "Synthetic CT-like tumour dataset generated by msam_components.data.synthetic",
        "reference": "none",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": num_cases,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(dataset, f, indent=4)
        f.write("\n")
    return cases


def make_imagestr_like(
    out_dir: PathLike,
    num_cases: int = 4,
    channel_suffix: bool = True,
    tumour_label: int = 2,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Sequence[float] = (1.0, 1.0, 1.5),
    seed: int = 0,
    prefix: str = "synth",
    image_dir: str = "imagesTr",
    label_dir: str = "labelsTr",
) -> list[str]:
    """Write an nnU-Net-like ``imagesTr/<case>[_0000].nii.gz`` + ``labelsTr/<case>.nii.gz`` layout; returns case ids."""
    shape = _check_shape(shape)
    root = Path(out_dir)
    cases = []
    for index in range(num_cases):
        case = f"{prefix}_{index:03d}"
        image, seg = _ct_case(_case_rng(seed, index), shape, spacing)
        image_name = f"{case}_0000.nii.gz" if channel_suffix else f"{case}.nii.gz"
        _save_nifti(image, root / image_dir / image_name, spacing)
        _save_nifti(_msd_labels(seg, tumour_label), root / label_dir / f"{case}.nii.gz", spacing)
        cases.append(case)
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: write a synthetic dataset in the chosen layout and print what was written."""
    parser = argparse.ArgumentParser(description="Write a small synthetic tumour dataset in an official layout.")
    parser.add_argument("--layout", required=True, choices=["kits19", "brats21", "msd", "imagestr"])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--num-cases", type=int, default=None, help="number of labelled cases (layout default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    parser.add_argument("--modalities", nargs="+", default=["flair", "t1ce"], help="BraTS modalities")
    parser.add_argument("--num-test", type=int, default=1, help="MSD image-only test cases")
    args = parser.parse_args(argv)
    kwargs: dict = {"seed": args.seed}
    if args.num_cases is not None:
        kwargs["num_cases"] = args.num_cases
    if args.shape is not None:
        kwargs["shape"] = tuple(args.shape)
    if args.layout == "kits19":
        cases = make_kits19_like(args.out, **kwargs)
        files = ["imaging.nii.gz", "segmentation.nii.gz"]
    elif args.layout == "brats21":
        cases = make_brats21_like(args.out, modalities=args.modalities, **kwargs)
        files = [f"<case>_{m}.nii.gz" for m in args.modalities] + ["<case>_seg.nii.gz"]
    elif args.layout == "msd":
        cases = make_msd_like(args.out, num_test=args.num_test, **kwargs)
        files = ["dataset.json", "imagesTr/<case>.nii.gz", "labelsTr/<case>.nii.gz", f"{args.num_test} in imagesTs/"]
    else:
        cases = make_imagestr_like(args.out, **kwargs)
        files = ["imagesTr/<case>_0000.nii.gz", "labelsTr/<case>.nii.gz"]
    print(f"wrote {len(cases)} synthetic {args.layout} cases to {os.path.abspath(args.out)} ({', '.join(files)}):")
    for case in cases:
        print(f"  {case}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
