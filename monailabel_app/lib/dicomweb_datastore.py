"""A DICOMweb datastore (e.g. Orthanc) whose local cache is confined as the local studies folder is.

Series Instance UIDs are the image ids. A series is fetched once (WADO-RS) into ``<cache>/<uid>/`` under file names this
app chooses, converted to ``<cache>/<uid>.nii.gz`` with SimpleITK's GDCM series reader (slices sorted by position along
their normal, as OHIF sorts them), then served like a local image. A ``final`` label is written back to the server as a
DICOM-SEG (dcmqi's ``itkimage2segimage``, through MONAI Label's converter) and kept in the cache; other tags stay local.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from .datastore import ConfinedDatastore, image_not_found
from .guard import check_label_volume, check_name, check_voxels, inside

logger = logging.getLogger(__name__)

SERIES_UID = re.compile(r"[0-9]+(\.[0-9]+)+")  # DICOM UI value: digits and dots, no empty component
MAX_UID_LENGTH = 64
SEG_TOOL = "itkimage2segimage"


def check_series_uid(value: Any, what: str = "image id") -> str:
    """A DICOM Series Instance UID (digits and dots, at most 64 characters); 400 naming the value otherwise."""
    if not isinstance(value, str) or not value:
        raise HTTPException(400, f"{what} must be a Series Instance UID, got {value!r}")
    if len(value) > MAX_UID_LENGTH or not SERIES_UID.fullmatch(value):
        raise HTTPException(
            400, f"{what} {value[:MAX_UID_LENGTH + 8]!r} is not a Series Instance UID (digits and dots)"
        )
    return value


def seg_tool_on_path() -> str | None:
    """Path of dcmqi's ``itkimage2segimage``: found on PATH or next to this interpreter (the venv's ``bin/``, which a
    server started without the venv on PATH lacks; it is then put on PATH for MONAI Label's converter)."""
    found = shutil.which(SEG_TOOL)
    if found:
        return found
    here = os.path.join(os.path.dirname(sys.executable), SEG_TOOL)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        os.environ["PATH"] = os.path.dirname(here) + os.pathsep + os.environ.get("PATH", "")
        return here
    return None


class ConfinedDICOMwebDatastore(ConfinedDatastore, DICOMWebDatastore):
    """MONAI Label's ``DICOMWebDatastore`` with the local datastore's rules: ids are checked Series Instance UIDs that
    the server lists, every cache read and write stays inside the cache folder (nothing follows a link out), a series
    larger than ``max_voxels`` is refused before it is fetched, and a saved label must be on its image's grid and hold
    only the app's label values (a ``final`` one also becomes a DICOM-SEG on the server)."""

    def __init__(self, client: Any, search_filter: dict[str, Any], cache_path: str | None, **kwargs: Any) -> None:
        """``kwargs``: ``limits`` and ``label_values`` as for :class:`ConfinedDatastore`."""
        self._fetch_lock = threading.Lock()
        super().__init__(
            client=client, search_filter=search_filter, cache_path=cache_path, convert_to_nifti=True, **kwargs
        )
        if seg_tool_on_path() is None:
            logger.warning(f"{SEG_TOOL} (pip package dcmqi) not found: saving a final label as DICOM-SEG will fail")

    @staticmethod
    def _valid(name: Any, what: str) -> bool:
        """Image and label ids must be Series Instance UIDs, tags single file names (lookups say "not found")."""
        try:
            check_series_uid(name, what) if what in ("image id", "label id") else check_name(name, what)
        except HTTPException:
            return False
        return True

    def list_images(self) -> list[str]:
        """The server's series (under the search filter) whose UID is a valid id."""
        series = super().list_images()
        kept = [s for s in series if self._valid(s, "image id")]
        if len(kept) < len(series):
            logger.warning(f"ignoring {len(series) - len(kept)} series whose UID is not a valid id")
        return kept

    def _download_labeled_data(self) -> None:
        """Training reads the labels saved through this app (kept in the cache); SEGs are not fetched."""

    def get_image_uri(self, image_id: str) -> str:
        """The cached NIfTI of a listed series (fetched and converted on first use); ``""`` for an invalid id."""
        if not self._valid(image_id, "image id"):
            return ""
        cached = self._confined(os.path.join(self._datastore.image_path(), image_id + ".nii.gz"))
        if cached and image_id in self._datastore.objects:
            return cached
        if image_id not in self.list_images():
            return ""
        with self._fetch_lock:  # one fetch at a time: a second request for the series finds it cached
            cached = self._confined(os.path.join(self._datastore.image_path(), image_id + ".nii.gz"))
            if cached and image_id in self._datastore.objects:
                return cached
            return self._fetch(image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The cached label of an image (as the local datastore finds it, never fetched); ``""`` for an invalid id or
        tag or one that resolves outside the cache."""
        if not (self._valid(label_id, "label id") and self._valid(label_tag, "label tag")):
            return ""
        return self._confined(LocalDatastore.get_label_uri(self, label_id, label_tag))

    def image_path_of(self, image_id: str) -> str:
        """Cached NIfTI of a series the server lists; 400 for an id that is no UID, 404 for one not listed."""
        check_series_uid(image_id, "image id")
        uri = self.get_image_uri(image_id)
        if not uri or not os.path.isfile(uri):
            raise image_not_found(image_id)
        return uri

    def _fetch(self, image_id: str) -> str:
        """Fetch a series into ``<cache>/<uid>/`` (files named here, written through a temporary folder of the cache),
        convert it to ``<cache>/<uid>.nii.gz`` and register it; 413 when it is over ``max_voxels``."""
        import pydicom
        import SimpleITK as sitk

        root = self._datastore.image_path()
        if os.path.islink(os.path.join(root, image_id)):  # a planted link is removed, never followed
            logger.warning(f"removing the link {os.path.join(root, image_id)!r} from the cache")
            os.remove(os.path.join(root, image_id))
        series_dir = inside(root, image_id, "image")
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        studies = {str(pydicom.Dataset.from_json(d).get("StudyInstanceUID", "")) for d in found}
        if len(studies) != 1 or "" in studies:
            raise image_not_found(image_id)
        study = studies.pop()
        meta = [pydicom.Dataset.from_json(m) for m in self._client.retrieve_series_metadata(study, image_id)]
        if not meta:
            raise image_not_found(image_id)
        rows, cols = int(meta[0].get("Rows", 0)), int(meta[0].get("Columns", 0))
        check_voxels((cols, rows, len(meta)), (1.0, 1.0, 1.0), self.limits, f"series {image_id!r}")
        work = tempfile.mkdtemp(prefix=".fetch_", dir=root)
        try:
            dicom_dir = os.path.join(work, "dicom")
            os.mkdir(dicom_dir)
            for n, instance in enumerate(self._client.retrieve_series(study, image_id)):
                instance.save_as(os.path.join(dicom_dir, f"{n:05d}.dcm"), write_like_original=False)
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(dicom_dir, image_id)
            if not names:
                raise HTTPException(502, f"series {image_id!r}: the server's instances hold no readable image series")
            reader.SetFileNames(names)
            converted = os.path.join(work, image_id + ".nii.gz")
            sitk.WriteImage(reader.Execute(), converted)
            if os.path.lexists(series_dir):
                (
                    shutil.rmtree(series_dir)
                    if os.path.isdir(series_dir) and not os.path.islink(series_dir)
                    else os.remove(series_dir)
                )
            os.replace(dicom_dir, series_dir)
            info = {
                "SeriesInstanceUID": image_id,
                "StudyInstanceUID": study,
                "Modality": str(meta[0].get("Modality", "")),
            }
            dest = os.path.join(root, image_id + ".nii.gz")
            if os.path.islink(dest):  # the cache is the app's: a planted link is removed, never followed
                logger.warning(f"removing the link {dest!r} from the cache (it pointed to {os.readlink(dest)!r})")
                os.remove(dest)
            ConfinedDatastore.add_image(self, image_id, converted, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self._confined(os.path.join(root, image_id + ".nii.gz"))

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Images come from the DICOMweb server: an upload is refused (405)."""
        raise HTTPException(405, "this datastore serves a DICOMweb server's series: store new images on the server")

    def remove_image(self, image_id: str) -> None:
        """Images belong to the DICOMweb server: removal is refused (405)."""
        raise HTTPException(405, "this datastore serves a DICOMweb server's series: remove images on the server")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check a NIfTI label against its series, store a ``final`` one on the server as a DICOM-SEG (it must hold a
        segment), then keep it in the cache as the local datastore does."""
        check_name(label_tag, "label tag")
        image_path = self.image_path_of(image_id)
        what = f"label {label_tag!r} of image {image_id!r}"
        if label_tag == DefaultLabelTag.FINAL.value:
            check_label_volume(label_filename, image_path, self.label_values(), self.limits, what)
            import nibabel as nib

            if not np.any(np.asarray(nib.load(label_filename).dataobj)):
                raise HTTPException(400, f"{what} is empty: a DICOM-SEG needs at least one labelled voxel")
            if seg_tool_on_path() is None:
                raise HTTPException(500, f"{SEG_TOOL} (pip package dcmqi) is not installed: cannot write a DICOM-SEG")
            series_dir = inside(self._datastore.image_path(), image_id, "image")
            seg_file = ""
            try:
                seg_file = nifti_to_dicom_seg(series_dir, label_filename, (label_info or {}).get("label_info"))
                if not seg_file or not os.path.isfile(seg_file):
                    raise HTTPException(500, f"{what}: {SEG_TOOL} wrote no DICOM-SEG")
                seg_series = dicom_web_upload_dcm(seg_file, self._client)
            except HTTPException:
                raise
            except Exception as err:  # noqa: BLE001 - the converter's or the server's failure, named
                raise HTTPException(502, f"{what}: storing it as DICOM-SEG on the server failed: {err}") from err
            finally:
                if seg_file and os.path.isfile(seg_file):
                    os.remove(seg_file)
            label_info = {
                **(label_info or {}),
                "SeriesInstanceUID": seg_series,
                "ReferencedSeriesInstanceUID": image_id,
            }
            logger.info(f"stored {what} on the DICOMweb server as DICOM-SEG series {seg_series}")
        return ConfinedDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
