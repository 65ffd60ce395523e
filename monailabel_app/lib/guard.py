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


def upload_extension(filename: str | None, what: str, extensions: Sequence[str], kind: str) -> str:
    """Which of ``extensions`` an uploaded file's name ends with (``.nii.gz`` when the client sent no name); 415 naming
    the file and the ``kind`` of file expected otherwise."""
    if not filename:
        return ".nii.gz"
    name = os.path.basename(filename).lower()
    for ext in extensions:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    raise HTTPException(415, f"{what} {os.path.basename(filename)!r} is not {kind} ({', '.join(extensions)})")


def nifti_extension(filename: str | None, what: str) -> str:
    """The NIfTI extension of an uploaded file's name (``.nii.gz`` when the client sent none); 415 for anything else."""
    return upload_extension(filename, what, NIFTI_EXTENSIONS, "a NIfTI file")


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
