"""A local MONAI Label datastore whose every read and write stays inside the studies folder."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from .guard import Limits, atomic_copy, check_label_volume, check_name, check_volume, inside, nifti_extension

logger = logging.getLogger(__name__)


def image_not_found(image_id: str) -> HTTPException:
    """The one answer for an image id that is not in the datastore (whatever exists elsewhere on the host)."""
    return HTTPException(404, f"image {image_id!r} not found in the datastore")


class ConfinedDatastore(LocalDatastore):
    """``LocalDatastore`` with image ids and label tags checked as single file names and uploads checked as volumes.

    Ids and tags with a path separator, ``..``, a leading dot or an absolute path are refused (400) before any file is
    touched; lookups of such names find nothing (``""``), as for a missing id. Images and labels are written through a
    temporary file and an atomic rename, so nothing half-written is left and a link in the studies is replaced, never
    written through. A saved label must be a NIfTI of its image's shape holding only the app's label values.
    """

    def __init__(self, *args: Any, limits: Limits, label_values: Callable[[], Sequence[int]], **kwargs: Any) -> None:
        """``label_values`` gives the values a label may hold (read when a label is saved)."""
        self.limits = limits
        self.label_values = label_values
        super().__init__(*args, **kwargs)

    @staticmethod
    def _valid(name: Any, what: str) -> bool:
        """Whether ``name`` passes :func:`check_name` (lookups answer "not found" instead of raising)."""
        try:
            check_name(name, what)
        except HTTPException:
            return False
        return True

    def _confined(self, path: str) -> str:
        """``path`` resolved (links followed) if it is a file inside the studies folder, else ``""``."""
        root = os.path.realpath(self._datastore_path)
        real = os.path.realpath(path) if path else ""
        if not real or os.path.commonpath([root, real]) != root or not os.path.isfile(real):
            return ""
        return real

    def _list_files(self, path: str, patterns: Sequence[str]) -> dict[str, str]:
        """The studies' image or label files, leaving out links (and anything else) that resolve outside the folder."""
        files = super()._list_files(path, patterns)
        kept = {name: file for name, file in files.items() if self._confined(os.path.join(path, file))}
        for name in sorted(set(files) - set(kept)):
            logger.warning(f"ignoring {os.path.join(path, name)!r}: it resolves outside the studies folder")
        return kept

    def get_image_uri(self, image_id: str) -> str:
        """Resolved path of a datastore image, ``""`` for an invalid or unknown id or one that resolves outside."""
        return self._confined(super().get_image_uri(image_id)) if self._valid(image_id, "image id") else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """Resolved path of a datastore label, ``""`` for an invalid or unknown id or tag or one that resolves outside."""
        if not (self._valid(label_id, "label id") and self._valid(label_tag, "label tag")):
            return ""
        return self._confined(super().get_label_uri(label_id, label_tag))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """An image's info; 400 for a bad id, 404 for one not in the datastore (or resolving outside it)."""
        self.image_path_of(image_id)
        return super().get_image_info(image_id)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Image/label pairs with a final label, both resolving inside the studies folder (what training reads)."""
        items = super().datalist(full_path=True)
        kept = [d for d in items if self._confined(d["image"]) and self._confined(d["label"])]
        if len(kept) < len(items):
            logger.warning(f"datalist: left out {len(items) - len(kept)} pair(s) resolving outside the studies folder")
        return kept

    def image_path_of(self, image_id: str) -> str:
        """Path of an existing datastore image inside the studies folder; 400 for a bad id, 404 naming a missing one."""
        check_name(image_id, "image id")
        uri = self.get_image_uri(image_id)
        if not uri or not os.path.isfile(uri):
            raise image_not_found(image_id)
        obj = self._datastore.objects[image_id]
        inside(self._datastore.image_path(), image_id + obj.image.ext, "image")
        return uri

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store a checked NIfTI volume as ``<studies>/<image_id><ext>`` (atomically) and register it."""
        ext = nifti_extension(os.path.basename(image_filename), "image file")
        if not image_id:
            image_id = os.path.basename(image_filename)[: -len(ext)]
        check_name(image_id, "image id")
        check_volume(image_filename, self.limits, f"image {image_id!r}")
        name = image_id + ext
        dest = inside(self._datastore.image_path(), name, "image")
        info = {**(image_info or {}), "ts": int(time.time()), "name": name}
        with FileLock(self._lock_file):
            atomic_copy(image_filename, dest)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info(f"added image {image_id!r} as {dest}")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a checked label as ``<studies>/labels/<tag>/<image_id><ext>`` (atomically) and register it."""
        check_name(label_tag, "label tag")
        image_path = self.image_path_of(image_id)
        ext = nifti_extension(os.path.basename(label_filename), "label file")
        what = f"label {label_tag!r} of image {image_id!r}"
        check_label_volume(label_filename, image_path, self.label_values(), self.limits, what)
        label_dir = inside(self._datastore.label_path(None), label_tag, "label tag")
        dest = inside(label_dir, image_id + ext, "label")
        info = {**(label_info or {}), "ts": int(time.time()), "name": image_id + ext}
        with FileLock(self._lock_file):
            os.makedirs(label_dir, exist_ok=True)
            atomic_copy(label_filename, dest)
            self._datastore.objects[image_id].labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info(f"saved {what} as {dest}")
        return image_id

    def remove_image(self, image_id: str) -> None:
        """Remove an image and its labels; 400 for a bad id."""
        check_name(image_id, "image id")
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove a label; 400 for a bad id or tag."""
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        super().remove_label(label_id, label_tag)
