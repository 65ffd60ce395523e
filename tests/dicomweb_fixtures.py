"""A private Orthanc (DICOMweb) holding small CT series made from the shared data, for tests of the DICOMweb path.

Reusable pieces, importable from any test (``tests/`` is on ``sys.path`` under pytest):

- :func:`orthanc_available` / :data:`ORTHANC_SKIP_REASON`: whether Debian's ``orthanc`` and ``orthanc-dicomweb`` are
  installed (tests skip with that reason otherwise);
- :class:`Orthanc`: start ``/usr/sbin/Orthanc`` on 127.0.0.1 with its own JSON config, storage and index folders in a
  temporary folder and free ports, wait until it answers, upload DICOM files, stop it by PID (never the system service);
- :func:`ct_volume` and :func:`write_series`: a CT crop of the shared sarcoma CT written slice by slice with SimpleITK
  in a chosen geometry (``axial``, ``oblique`` direction cosines, ``flipped``: a left-handed grid whose slices run
  against the slice normal, written in reversed instance order);
- :func:`series_geometry`: the voxel <-> patient mapping of a stored series as OHIF builds its volume (slices sorted by
  position along the normal), read from the DICOMweb metadata;
- the pytest fixture :func:`dicomweb` (module scope): a started Orthanc with one series of each geometry; it yields
  ``{"url": <DICOMweb root>, "rest": <Orthanc REST root>, "study", "series"` (the axial one), "series_by_kind",
  "orthanc"}``. Import it into a test module with ``from dicomweb_fixtures import dicomweb  # noqa: F401``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "sts_ct" / "STS_001" / "CT_image.nii.gz"
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN_CANDIDATES = (  # where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`)
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
START_TIMEOUT_S = 60
SERIES_KINDS = ("axial", "oblique", "flipped")
# voxels (i, j, k) of the test series and the subsampling of the shared CT: about 187 x 187 x 157 mm (the tiny test
# model's 96 mm window fits around a click at 30 % of an axis) in 0.44 M voxels, so conversion and inference are quick
CROP_SHAPE = (96, 96, 48)
CROP_STEP = (2, 2, 1)
ROOT_UID = "1.2.826.0.1.3680043.8.498"  # pydicom's UID root, for UIDs made up by these tests


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library installed by Debian's ``orthanc-dicomweb``, or ``None``."""
    found = [p for p in DICOMWEB_PLUGIN_CANDIDATES if p.exists()]
    if not found:
        found = sorted(Path("/usr/share/orthanc/plugins").glob("libOrthancDicomWeb.so*"))
    return found[0] if found else None


def orthanc_available() -> bool:
    """Whether ``/usr/sbin/Orthanc`` and its DICOMweb plugin are both installed."""
    return ORTHANC_BIN.exists() and dicomweb_plugin() is not None


ORTHANC_SKIP_REASON = (
    f"needs Debian's orthanc and orthanc-dicomweb ({ORTHANC_BIN}, {DICOMWEB_PLUGIN_CANDIDATES[0]}); "
    "`make test-browser` installs them"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """A private Orthanc process: its own config, storage and index folders under ``root``, HTTP on a free port of
    127.0.0.1, the DICOM (C-STORE) server disabled, the DICOMweb plugin at ``/dicom-web/``."""

    def __init__(self, root: str | os.PathLike) -> None:
        """Write the config under ``root`` (nothing is started yet)."""
        plugin = dicomweb_plugin()
        if not ORTHANC_BIN.exists() or plugin is None:
            raise RuntimeError(ORTHANC_SKIP_REASON)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.rest = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.rest}/dicom-web"
        self.config_path = self.root / "orthanc.json"
        config = {
            "Name": "msam-test-orthanc",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # 127.0.0.1 only
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
            "StableAge": 1,
            "HttpTimeout": 60,
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "orthanc.log"

    def start(self, timeout: float = START_TIMEOUT_S) -> Orthanc:
        """Start the process and wait until both its REST API and its DICOMweb root answer; error with its log else."""
        import httpx

        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(self.config_path)], cwd=str(self.root), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if (
                    httpx.get(f"{self.rest}/system", timeout=5).status_code == 200
                    and httpx.get(f"{self.url}/studies", timeout=5).status_code == 200
                ):
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer in {timeout} s:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        """The end of the process's log."""
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Terminate the process this object started (by its PID), killing it if it does not stop in 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def upload(self, files: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
        """POST each DICOM file to ``/instances`` (Orthanc's REST upload); the answers, error naming a refused file."""
        import httpx

        answers = []
        for f in files:
            r = httpx.post(f"{self.rest}/instances", content=Path(f).read_bytes(), timeout=60)
            if r.status_code != 200:
                raise RuntimeError(f"Orthanc refused {f}: {r.status_code} {r.text[:300]}")
            answers.append(r.json())
        return answers

    def series_of_modality(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        """QIDO-RS: the study's series of one modality (DICOM JSON), ``[]`` when none."""
        import httpx

        r = httpx.get(f"{self.url}/studies/{study_uid}/series", params={"Modality": modality}, timeout=30)
        if r.status_code != 200 or not r.content.strip():
            return []
        return r.json()

    def instance_file(self, sop_uid: str) -> bytes:
        """The DICOM file of one instance, found by its SOP Instance UID through Orthanc's REST API."""
        import httpx

        found = httpx.post(f"{self.rest}/tools/lookup", content=sop_uid, timeout=30).json()
        ids = [f["ID"] for f in found if f["Type"] == "Instance"]
        if not ids:
            raise KeyError(f"Orthanc has no instance {sop_uid}")
        return httpx.get(f"{self.rest}/instances/{ids[0]}/file", timeout=60).content


def ct_volume(
    shape: Sequence[int] = CROP_SHAPE, step: Sequence[int] = CROP_STEP
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A crop of the shared sarcoma CT (HU, int16, indexed ``[i, j, k]``) around its centre, every ``step``-th voxel
    per axis, and its voxel size (mm)."""
    import nibabel as nib

    img = nib.load(str(SHARED_CT))
    data = np.asarray(img.dataobj)
    centre = [s // 2 for s in data.shape[:3]]
    sl = tuple(slice(c - n * st // 2, c - n * st // 2 + n * st, st) for c, n, st in zip(centre, shape, step))
    crop = np.clip(np.rint(data[sl]), -1024, 3071).astype(np.int16)
    if crop.shape != tuple(shape):
        raise ValueError(f"the shared CT {SHARED_CT} {data.shape} is too small for a {list(shape)} crop every {step}")
    zooms = tuple(float(z) * st for z, st in zip(img.header.get_zooms()[:3], step))
    return crop, zooms  # type: ignore[return-value]


def direction_of(kind: str) -> np.ndarray:
    """Direction cosines (columns: the i, j, k axes in LPS) of a test series geometry."""
    if kind == "axial":
        return np.eye(3)
    if kind == "oblique":  # 20 degrees about z, then 25 degrees about x: no axis along a patient axis
        a, b = np.deg2rad(20.0), np.deg2rad(25.0)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        return rx @ rz
    if kind == "flipped":  # k runs against row x column: slice k=0 is the highest along the normal
        return np.diag([1.0, 1.0, -1.0])
    raise ValueError(f"unknown series kind {kind!r}; use one of {SERIES_KINDS}")


def new_uid(tail: str) -> str:
    """A made-up DICOM UID under :data:`ROOT_UID` (digits and dots, at most 64 characters)."""
    return f"{ROOT_UID}.{tail}"[:64]


def write_series(
    folder: str | os.PathLike,
    kind: str,
    study_uid: str,
    series_uid: str,
    volume: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] = (-20.0, 30.0, 100.0),
) -> list[Path]:
    """Write ``volume`` (default :func:`ct_volume`) as a CT series, one SimpleITK-written file per slice, in the
    geometry ``kind``; the ``flipped`` series is written in reversed instance order. Returns the files."""
    import SimpleITK as sitk

    if volume is None:
        volume, spacing = ct_volume()
    spacing = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
    direction = direction_of(kind)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grid = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    grid.SetSpacing(spacing)
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection(tuple(float(v) for v in direction.ravel()))
    row, col = direction[:, 0], direction[:, 1]
    nk = volume.shape[2]
    order = list(range(nk))[::-1] if kind == "flipped" else list(range(nk))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    date = time.strftime("%Y%m%d")
    for number, k in enumerate(order, start=1):
        plane = grid[:, :, k]
        position = grid.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": new_uid(f"{series_uid.rsplit('.', 1)[-1]}.{k + 1}"),
            "0008|0020": date,
            "0008|0030": "120000",
            "0008|0050": "MSAMTEST",
            "0010|0010": "MSAM^Test",
            "0010|0020": "MSAM-TEST-1",
            "0008|1030": "M-SAM DICOMweb test study",
            "0008|103e": f"M-SAM test CT {kind}",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0010": "1",
            "0020|0011": str(SERIES_KINDS.index(kind) + 1 if kind in SERIES_KINDS else 9),
            "0020|0013": str(number),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*row, *col)),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",  # between rows, between columns
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        path = folder / f"slice_{number:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        files.append(path)
    return files


class SeriesGeometry:
    """Voxel -> patient (LPS mm) mapping of a stored series as OHIF builds its volume: ``i`` along a row, ``j`` down a
    column, ``k`` over the slices sorted by position along the slice normal (row x column)."""

    def __init__(self, metadata: list[dict[str, Any]]) -> None:
        """Read orientation, spacing and sorted slice positions from DICOM JSON metadata (WADO-RS ``/metadata``)."""

        def tag(instance: dict[str, Any], key: str) -> list[Any]:
            return list(instance.get(key, {}).get("Value", []))

        if not metadata:
            raise ValueError("series metadata is empty")
        orient = np.array(tag(metadata[0], "00200037"), dtype=float)
        spacing = np.array(tag(metadata[0], "00280030"), dtype=float)
        if orient.size != 6 or spacing.size != 2:
            raise ValueError(f"series metadata lacks ImageOrientationPatient/PixelSpacing: {orient}, {spacing}")
        self.row_dir, self.col_dir = orient[:3], orient[3:]
        self.normal = np.cross(self.row_dir, self.col_dir)
        positions = [np.array(tag(m, "00200032"), dtype=float) for m in metadata]
        self.positions = sorted(positions, key=lambda p: float(p @ self.normal))
        self.row_spacing, self.col_spacing = float(spacing[0]), float(spacing[1])
        self.dims = (int(tag(metadata[0], "00280011")[0]), int(tag(metadata[0], "00280010")[0]), len(positions))
        gaps = np.diff([float(p @ self.normal) for p in self.positions])
        self.slice_spacing = float(np.median(gaps)) if gaps.size else 1.0

    def world(self, ijk: Sequence[float]) -> np.ndarray:
        """Patient coordinates (LPS mm) of voxel ``ijk`` (integer slice index ``k``)."""
        i, j, k = ijk
        return self.positions[int(k)] + i * self.col_spacing * self.row_dir + j * self.row_spacing * self.col_dir

    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along ``i, j, k``."""
        return np.array([self.col_spacing, self.row_spacing, self.slice_spacing])


def series_geometry(dicomweb_url: str, study_uid: str, series_uid: str) -> SeriesGeometry:
    """The :class:`SeriesGeometry` of a series stored behind ``dicomweb_url`` (WADO-RS metadata)."""
    import httpx

    r = httpx.get(f"{dicomweb_url}/studies/{study_uid}/series/{series_uid}/metadata", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"no metadata for series {series_uid}: {r.status_code} {r.text[:300]}")
    return SeriesGeometry(r.json())


def start_orthanc_with_series(root: str | os.PathLike, kinds: Sequence[str] = SERIES_KINDS) -> dict[str, Any]:
    """Start an :class:`Orthanc` under ``root`` and store one series per geometry in ``kinds`` (one study); returns
    the dict the :func:`dicomweb` fixture yields (the caller stops ``["orthanc"]``)."""
    root = Path(root)
    orthanc = Orthanc(root / "orthanc").start()
    try:
        stamp = f"{int(time.time())}{os.getpid() % 10000}"
        study = new_uid(f"1.{stamp}")
        by_kind = {}
        volume, spacing = ct_volume()
        for n, kind in enumerate(kinds, start=2):
            series = new_uid(f"{n}.{stamp}")
            orthanc.upload(write_series(root / "dicom" / kind, kind, study, series, volume, spacing))
            by_kind[kind] = series
    except BaseException:
        orthanc.stop()
        raise
    return {
        "url": orthanc.url,
        "rest": orthanc.rest,
        "study": study,
        "series": by_kind[kinds[0]],
        "series_by_kind": by_kind,
        "orthanc": orthanc,
        "volume": volume,
        "spacing": spacing,
    }


@pytest.fixture(scope="module")
def dicomweb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A private Orthanc holding one study with an axial, an oblique and a flipped CT series (see the module
    docstring for the keys); skips when Orthanc, its DICOMweb plugin or the shared CT is missing."""
    if not orthanc_available():
        pytest.skip(ORTHANC_SKIP_REASON)
    if not SHARED_CT.exists():
        pytest.skip(f"shared test data not found at {SHARED_CT}")
    root = tmp_path_factory.mktemp("dicomweb")
    info = start_orthanc_with_series(root)
    try:
        yield info
    finally:
        info["orthanc"].stop()
        shutil.copy(info["orthanc"].log_path, root / "orthanc_final.log")


if __name__ == "__main__":  # manual check: start one, print its URLs and series, stop it on Enter
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_orthanc_with_series(tmp)
        print(json.dumps({k: v for k, v in stack.items() if isinstance(v, (str, dict))}, indent=1))
        try:
            input("Orthanc running; Enter stops it ")
        finally:
            stack["orthanc"].stop()
