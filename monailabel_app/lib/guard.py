"""Request limits and input checks of the MONAI Label app: names, uploads, volumes and parameters.

Everything here raises ``fastapi.HTTPException`` with a 4xx code and a message naming the key, value or file at fault,
so a client can act on it and the server keeps serving.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
from fastapi import HTTPException

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
MAX_NAME_LENGTH = 128
CHUNK = 1 << 20
AFFINE_TOLERANCE_MM = 1e-3  # NIfTI stores affines in float32: same grid within rounding, not a shifted one


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask of the server; each is set with ``--conf <name> <value>``."""

    max_clicks: int = 100  # foreground + background clicks per infer request
    max_voxels: int = 512**3  # voxels of a volume as stored and after resampling to a bundle's spacing
    max_upload_mb: float = 1024.0  # size of one uploaded file
    max_params_kb: float = 64.0  # size of the JSON params field of a request
    max_pending_infers: int = 4  # infer requests running or waiting; more answer 429
    max_train_epochs: int = 100  # largest max_epochs a train request may ask for
    max_learning_rate: float = 0.1  # largest learning_rate a train request may ask for

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Limits:
        """Read the caps from the app's ``--conf`` values; a value that is not a positive number names its key."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in conf:
                continue
            raw = conf[f.name]
            kind = int if f.type == "int" else float
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                raise ValueError(f"--conf {f.name}: expected a positive {kind.__name__}, got {raw!r}") from None
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--conf {f.name}: expected a positive {kind.__name__}, got {raw!r}")
            values[f.name] = value
        return cls(**values)

    @property
    def max_upload_bytes(self) -> int:
        """Upload cap in bytes."""
        return int(self.max_upload_mb * 2**20)

    @property
    def max_params_bytes(self) -> int:
        """Params cap in bytes."""
        return int(self.max_params_kb * 2**10)


def check_name(value: Any, what: str) -> str:
    """An image id or label tag that is safe as one file-name component: no separator, no ``..``, not absolute."""
    if not isinstance(value, str) or not value:
        raise HTTPException(400, f"{what} must be a non-empty string, got {value!r}")
    bad = None
    if len(value) > MAX_NAME_LENGTH:
        bad = f"is longer than {MAX_NAME_LENGTH} characters"
    elif os.path.isabs(value) or any(sep in value for sep in ("/", "\\", os.sep, os.altsep) if sep):
        bad = "must not be a path (no '/' or '\\')"
    elif ".." in value or value.startswith("."):
        bad = "must not contain '..' or start with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        bad = "must not contain control characters"
    if bad:
        raise HTTPException(400, f"{what} {value[:MAX_NAME_LENGTH]!r} {bad}")
    return value


def inside(root: str | os.PathLike, name: str, what: str) -> str:
    """``root/name`` after checking that it stays inside ``root`` (lexically and after resolving links)."""
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, name))
    real_base, real = os.path.realpath(base), os.path.realpath(path)
    if os.path.commonpath([base, path]) != base or os.path.commonpath([real_base, real]) != real_base:
        raise HTTPException(400, f"{what} {name!r} is outside the studies folder")
    return path


def nifti_extension(filename: str | None, what: str) -> str:
    """The NIfTI extension of an uploaded file's name (``.nii.gz`` when the client sent none); 415 for anything else."""
    if not filename:
        return ".nii.gz"
    name = os.path.basename(filename).lower()
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    raise HTTPException(415, f"{what} {os.path.basename(filename)!r} is not a NIfTI file (.nii or .nii.gz)")


def parse_params(
    text: str | bytes | None, limits: Limits, what: str = "params", max_bytes: int | None = None
) -> dict[str, Any]:
    """A request's JSON params: size-capped (``max_bytes``, default the ``max_params_kb`` cap) and a JSON object, else
    4xx with the reason."""
    if text is None or (isinstance(text, (str, bytes)) and not text.strip()):
        return {}
    cap = max_bytes or limits.max_params_bytes
    if len(text) > cap:
        raise HTTPException(413, f"{what} is {len(text)} bytes; the cap is {cap} (--conf max_params_kb)")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise HTTPException(400, f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise HTTPException(400, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def save_upload(stream: IO[bytes], folder: str | os.PathLike, ext: str, limits: Limits, what: str) -> str:
    """Copy an upload into ``folder`` in chunks, refusing (413) as soon as it passes the size cap."""
    path = os.path.join(folder, f"upload{ext}")
    size = 0
    with open(path, "wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > limits.max_upload_bytes:
                raise HTTPException(
                    413, f"{what} is larger than the cap of {limits.max_upload_mb:g} MB (--conf max_upload_mb)"
                )
            out.write(chunk)
    return path


def check_voxels(shape: Sequence[int], zooms: Sequence[float], limits: Limits, what: str, pixdim: Any = None) -> None:
    """Refuse (413) a volume whose voxel count, as stored or after resampling to ``pixdim``, passes the cap."""
    shape = [int(s) for s in shape[:3]]
    stored = math.prod(shape)
    if stored > limits.max_voxels:
        raise HTTPException(
            413, f"{what} has {stored} voxels {shape}; the cap is {limits.max_voxels} (--conf max_voxels)"
        )
    if pixdim is None:
        return
    target = [float(p) for p in np.broadcast_to(np.asarray(pixdim, dtype=float).ravel(), (3,))]
    resampled = math.prod(max(1, math.ceil(s * abs(float(z)) / t)) for s, z, t in zip(shape, zooms[:3], target))
    if resampled > limits.max_voxels:
        raise HTTPException(
            413,
            f"{what} would have {resampled} voxels after resampling its {[round(float(z), 3) for z in zooms[:3]]} mm "
            f"voxels to {target} mm; the cap is {limits.max_voxels} (--conf max_voxels)",
        )


def check_volume(path: str, limits: Limits, what: str, read_data: bool = True) -> nib.Nifti1Image:
    """A readable 3-D NIfTI within the caps, with finite positive voxel sizes and a finite affine; 4xx otherwise."""
    size = os.path.getsize(path)
    if size > limits.max_upload_bytes:
        raise HTTPException(
            413, f"{what} is {size} bytes; the cap is {limits.max_upload_mb:g} MB (--conf max_upload_mb)"
        )
    try:
        img = nib.load(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is the upload's fault
        raise HTTPException(400, f"{what} is not a readable NIfTI volume: {err}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise HTTPException(400, f"{what} is not a NIfTI volume (read as {type(img).__name__})")
    shape = img.shape
    if len(shape) < 3 or any(s != 1 for s in shape[3:]) or min(shape[:3]) < 1:
        raise HTTPException(400, f"{what} must be one 3-D volume, got shape {list(shape)}")
    zooms = img.header.get_zooms()[:3]
    if not all(math.isfinite(float(z)) and float(z) > 0 for z in zooms):
        raise HTTPException(400, f"{what} has voxel sizes {[float(z) for z in zooms]}: they must be finite and > 0")
    if not np.all(np.isfinite(img.affine)):
        raise HTTPException(400, f"{what} has a non-finite affine (NaN or Inf in its sform/qform)")
    check_voxels(shape, zooms, limits, what)
    if read_data:
        try:
            np.asarray(img.dataobj)
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise HTTPException(400, f"{what} has unreadable voxel data (truncated or corrupt): {err}") from None
    return img


def check_label_volume(path: str, image_path: str, label_values: Sequence[int], limits: Limits, what: str) -> None:
    """A label upload fits its image: same 3-D shape, integer values among ``label_values``; 4xx otherwise."""
    label = check_volume(path, limits, what, read_data=False)
    image = nib.load(image_path)
    image_shape = tuple(image.shape[:3])
    if tuple(label.shape[:3]) != image_shape:
        raise HTTPException(400, f"{what} has shape {list(label.shape[:3])}, its image has {list(image_shape)}")
    if not np.allclose(label.affine, image.affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        raise HTTPException(
            400,
            f"{what} is not on its image's grid: label affine {np.round(label.affine, 4).tolist()}, image affine "
            f"{np.round(image.affine, 4).tolist()} (they may differ by at most {AFFINE_TOLERANCE_MM} mm)",
        )
    try:
        data = np.asarray(label.dataobj)
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data
        raise HTTPException(400, f"{what} has unreadable voxel data (truncated or corrupt): {err}") from None
    values = np.unique(data)
    allowed = {0, *[int(v) for v in label_values]}
    bad = [v.item() for v in values[:1000] if not (np.isfinite(v) and float(v).is_integer() and int(v) in allowed)]
    if bad:
        raise HTTPException(
            400,
            f"{what} holds values {bad[:5]}{' ...' if len(bad) > 5 else ''}; a label may hold only {sorted(allowed)}",
        )


def atomic_copy(source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy ``source`` to ``dest`` through a temporary file in the same folder, so ``dest`` is never half-written and a
    link at ``dest`` is replaced rather than written through."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, CHUNK)
        shutil.copymode(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


LABEL_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".bin")  # the stock clients: Slicer (.nrrd), OHIF (.bin)
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI affines are RAS, NRRD's "left-posterior-superior" is LPS


def label_extension(filename: str | None, what: str) -> str:
    """The label format of an uploaded file's name (``.nii.gz`` when the client sent none); 415 for anything else."""
    if not filename:
        return ".nii.gz"
    name = os.path.basename(filename).lower()
    for ext in LABEL_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ".nrrd" if ext == ".seg.nrrd" else ext
    raise HTTPException(
        415, f"{what} {os.path.basename(filename)!r} is not a label file ({', '.join(LABEL_EXTENSIONS)})"
    )


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
