"""File formats of the stock MONAI Label clients: the labels they upload (NIfTI, 3D Slicer's NRRD, OHIF's
``label.bin``) read as NIfTI, and the result file a request asks for (``result_extension``, ``result_dtype``,
``result_compress``) written in the image's geometry. Bad input raises a 4xx ``HTTPException`` naming it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import nibabel as nib
import numpy as np
from fastapi import HTTPException

from .guard import NIFTI_EXTENSIONS, Limits, check_voxels, upload_extension

LABEL_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".bin")  # the stock clients: Slicer (.nrrd), OHIF (.bin)
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI affines are RAS, NRRD's "left-posterior-superior" is LPS


def label_extension(filename: str | None, what: str) -> str:
    """The label format of an uploaded file's name (``.nii.gz`` when the client sent none); 415 for anything else."""
    ext = upload_extension(filename, what, LABEL_EXTENSIONS, "a label file")
    return ".nrrd" if ext == ".seg.nrrd" else ext


def _sniff(path: str) -> str:
    """The format of a ``.bin`` upload from its first bytes: ``.nrrd``, ``.nii.gz``, ``.nii`` or ``.raw``."""
    with open(path, "rb") as f:
        head = f.read(352)
    if head[:4] == b"NRRD":
        return ".nrrd"
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return ".nii"
    return ".raw"


def _nrrd_affine(header: Mapping[str, Any], what: str) -> np.ndarray:
    """The RAS voxel-to-world affine of a 3-D NRRD header; 400 naming what is missing or unsupported."""
    space = str(header.get("space", "")).lower()
    if space in ("left-posterior-superior", "lps"):
        flip = LPS_FROM_RAS  # its own inverse
    elif space in ("right-anterior-superior", "ras"):
        flip = np.eye(4)
    else:
        raise HTTPException(400, f"{what}: NRRD space {header.get('space')!r} is not LPS or RAS")
    dirs = np.asarray(header.get("space directions", []), dtype=float)
    origin = np.asarray(header.get("space origin", [0.0, 0.0, 0.0]), dtype=float)
    if dirs.shape != (3, 3) or origin.shape != (3,) or not (np.all(np.isfinite(dirs)) and np.all(np.isfinite(origin))):
        raise HTTPException(400, f"{what}: NRRD needs finite 3x3 'space directions' and a 3-vector 'space origin'")
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = dirs.T, origin
    return flip @ affine


def label_as_nifti(path: str, ext: str, image_path: str, folder: str, limits: Limits, what: str) -> str:
    """An uploaded label in a stock client's format as a NIfTI file (``path`` itself when it is one, else a file in
    ``folder``): NIfTI, NRRD (3D Slicer; geometry from its header) or OHIF's ``label.bin``, which is the panel's
    labelmap bytes (uint8, first axis fastest, the image's voxel order) or an NRRD/NIfTI file under that name. The
    result still has to pass :func:`check_label_volume`."""
    if ext == ".bin":
        ext = _sniff(path)
        if ext in NIFTI_EXTENSIONS:
            named = os.path.join(folder, "label_upload" + ext)
            os.replace(path, named)
            return named
    if ext in NIFTI_EXTENSIONS:
        return path
    image = nib.load(image_path)
    shape = tuple(int(s) for s in image.shape[:3])
    if ext == ".nrrd":
        import nrrd

        try:
            data, header = nrrd.read(path, index_order="F")
        except Exception as err:  # noqa: BLE001 - any reader failure is the upload's fault
            raise HTTPException(400, f"{what} is not a readable NRRD file: {err}") from None
        if data.ndim != 3:
            raise HTTPException(400, f"{what} must be one 3-D NRRD volume, got shape {list(data.shape)}")
        check_voxels(data.shape, (1.0, 1.0, 1.0), limits, what)
        affine = _nrrd_affine(header, what)
    else:
        size, count = os.path.getsize(path), math.prod(shape)
        if size != count:
            raise HTTPException(
                400,
                f"{what} is {size} bytes of raw label voxels; its image has {count} voxels {list(shape)}, so a raw "
                f"uint8 label must be {count} bytes",
            )
        data, affine = np.fromfile(path, dtype=np.uint8).reshape(shape, order="F"), image.affine
    out = os.path.join(folder, "label_upload.nii.gz")
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_data_dtype(np.asarray(data).dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, out)
    return out


def result_format(request: Mapping[str, Any]) -> tuple[str, np.dtype, bool]:
    """The result file format a request asks for (``result_extension``, ``result_dtype``, ``result_compress``, as the
    OHIF and Slicer clients send them): defaults ``.nii.gz``, ``uint8``, compressed; 400 naming an unknown value."""
    ext = request.get("result_extension") or ".nii.gz"
    if isinstance(ext, str) and ext and not ext.startswith("."):
        ext = "." + ext
    if not isinstance(ext, str) or ext.lower() not in RESULT_EXTENSIONS:
        raise HTTPException(400, f"result_extension {ext!r} is not supported; use one of {list(RESULT_EXTENSIONS)}")
    dtype = request.get("result_dtype") or "uint8"
    if not isinstance(dtype, str) or dtype not in RESULT_DTYPES:
        raise HTTPException(400, f"result_dtype {dtype!r} is not supported; use one of {list(RESULT_DTYPES)}")
    compress = request.get("result_compress", True)
    if not isinstance(compress, bool):
        raise HTTPException(400, f"result_compress must be true or false, got {compress!r}")
    return ext.lower(), np.dtype(dtype), compress


def write_mask(path: str, mask: np.ndarray, image: nib.Nifti1Image, dtype: np.dtype, compress: bool) -> None:
    """Write ``mask`` (the image's voxel order) in the image's geometry: NIfTI by ``path``'s extension, or NRRD (LPS
    space, first axis fastest, ``gzip`` or ``raw`` encoding by ``compress``)."""
    data = np.asarray(mask).astype(dtype, copy=False)
    if path.endswith(".nrrd"):
        import nrrd

        affine = LPS_FROM_RAS @ np.asarray(image.affine, dtype=float)
        header = {
            "type": dtype.name,
            "dimension": 3,
            "space": "left-posterior-superior",
            "sizes": list(data.shape),
            "space directions": affine[:3, :3].T,
            "space origin": affine[:3, 3],
            "kinds": ["domain", "domain", "domain"],
            "endian": "little",
            "encoding": "gzip" if compress else "raw",
        }
        nrrd.write(path, data, header, index_order="F")
        return
    header = image.header.copy()
    header.set_data_dtype(dtype)
    nib.save(nib.Nifti1Image(data, image.affine, header), path)
