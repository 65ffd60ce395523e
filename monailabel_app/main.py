"""MONAI Label app serving every M-SAM bundle under ``bundles/`` as an interactive (click) segmentation task.

Start (from the repository root, with ``make label-venv`` done)::

    .venv-label/bin/monailabel start_server --app monailabel_app --studies /data/images \
        --host 127.0.0.1 --port 8000 --conf models all

App options (``--conf KEY VALUE``):
    bundles          folder holding the bundles (default: ``bundles/`` next to this app)
    models           ``all`` (default) or a comma-separated list of bundle names
    <bundle>_ckpt    weights for that bundle (default: ``<bundle>/models/model.pt``)
    overlay          comma-separated extra config files applied on top of every bundle's ``inference.yaml``
    <bundle>_overlay the same for one bundle
    device           torch device, e.g. ``cpu`` or ``cuda:0`` (default: the bundle's choice)

Limits (``--conf KEY VALUE``, see ``lib/guard.py``): ``max_clicks`` (100 per infer request), ``max_voxels`` (512**3, as
stored and after resampling to the bundle's spacing), ``max_upload_mb`` (1024), ``max_params_kb`` (64),
``max_pending_infers`` (4 running or waiting; more get 429), ``max_train_epochs`` (100), ``max_learning_rate`` (0.1).

``--studies http://127.0.0.1:8042/dicom-web`` serves a DICOMweb server's series (ids: Series Instance UIDs; cached
under ``MONAI_LABEL_DICOMWEB_CACHE_PATH``); a ``final`` label goes back to it as a DICOM-SEG (see
``lib/dicomweb_datastore.py``).

Image ids and label tags must be single file names (no ``/``, ``\\``, ``..``, leading dot, absolute path); every read and
write stays inside the studies folder. ``POST /train/<bundle>/restore`` serves the previous weights again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.bundle_infer import MSAMBundleInferTask  # noqa: E402
from lib.bundle_train import MSAMBundleTrainTask, restore_previous, validate_train_params  # noqa: E402
from lib.datastore import ConfinedDatastore  # noqa: E402
from lib.dicomweb_datastore import ConfinedDICOMwebDatastore  # noqa: E402
from lib.guard import Limits, check_name  # noqa: E402

logger = logging.getLogger(__name__)


def discover_bundles(root: Path, selection: str = "all") -> list[Path]:
    """Bundle folders under ``root`` that have ``configs/inference.yaml``, filtered by a comma-separated selection."""
    found = sorted(p.parent.parent for p in root.glob("*/configs/inference.yaml"))
    if selection.strip().lower() in ("", "all"):
        return found
    wanted = [s.strip() for s in selection.split(",") if s.strip()]
    names = {p.name: p for p in found}
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"--conf models: no bundle named {missing} under {root} (found {sorted(names)})")
    return [names[w] for w in wanted]


def _paths(value: str | None) -> list[str]:
    """Split a comma-separated list of paths from ``--conf`` into absolute paths."""
    return [str(Path(p.strip()).expanduser().resolve()) for p in (value or "").split(",") if p.strip()]


class MSAMApp(MONAILabelApp):
    """One DeepGrow-type infer task per bundle: Slicer/OHIF send foreground/background voxel clicks."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        """Resolve the bundle folder from ``conf`` and let MONAILabelApp build datastore and tasks."""
        conf = conf or {}
        self.limits = Limits.from_conf(conf)
        self._infer_slots = threading.BoundedSemaphore(self.limits.max_pending_infers)
        self.bundles_root = Path(conf.get("bundles", APP_DIR.parent / "bundles")).expanduser().resolve()
        self.bundle_dirs = discover_bundles(self.bundles_root, conf.get("models", "all"))
        settings.MONAI_LABEL_SESSIONS = False  # the stock session upload unpacks anywhere; lib/stock_routes.py says so
        if not self.bundle_dirs:
            raise ValueError(f"no bundle with configs/inference.yaml under {self.bundles_root}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="M-SAM",
            description="Interactive 3-D tumour segmentation from clicks (M-SAM bundles)",
            version="0.1.0",
        )

    def init_datastore(self) -> Datastore:
        """A local datastore confined to the studies folder, or (``--studies http(s)://...``) a DICOMweb server's series
        with a confined cache; both check ids, tags and uploads."""
        if self.studies.startswith(("http://", "https://")):
            return self._dicomweb_datastore(self.studies.rstrip("/").strip())
        return ConfinedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            limits=self.limits,
            label_values=self.label_values,
        )

    def _dicomweb_datastore(self, url: str) -> Datastore:
        """A DICOMweb server (MONAI Label's client and ``MONAI_LABEL_DICOMWEB_*`` / ``MONAI_LABEL_QIDO_PREFIX``...
        settings) whose series are the images; the cache is ``MONAI_LABEL_DICOMWEB_CACHE_PATH`` (default under
        ``~/.cache/monailabel/dicom``). dcmqi comes from the app's requirements, never downloaded at start."""
        from dicomweb_client.session_utils import create_session_from_user_pass
        from monailabel.datastore.dicom import DICOMwebClientX

        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(
                settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
            )
        client = DICOMwebClientX(
            url=url,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        return ConfinedDICOMwebDatastore(
            client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache,
            limits=self.limits,
            label_values=self.label_values,
        )

    def label_values(self) -> list[int]:
        """Values a saved label may hold besides 0: the served tasks' label ids."""
        return sorted({int(v) for task in getattr(self, "_infers", {}).values() for v in task.labels.values()} or {1})

    def init_infers(self) -> dict[str, InferTask]:
        """Register the bundles' inference pipelines by bundle name."""
        infers: dict[str, InferTask] = {}
        for bundle in self.bundle_dirs:
            name = bundle.name
            overlays = _paths(self.conf.get("overlay")) + _paths(self.conf.get(f"{name}_overlay"))
            ckpt = self.conf.get(f"{name}_ckpt")
            task = MSAMBundleInferTask(
                bundle,
                ckpt_path=Path(ckpt).expanduser().resolve() if ckpt else None,
                overlays=overlays,
                device=self.conf.get("device"),
                max_clicks=self.limits.max_clicks,
                max_voxels=self.limits.max_voxels,
            )
            infers[name] = task
            state = "weights " + str(task.ckpt_path) + ("" if task.ckpt_path.is_file() else " MISSING")
            logger.info(f"M-SAM task {name}: label {task.label_name!r}, {state}")
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        """One train task per bundle: the bundle's train.yaml on the datastore's labelled images."""
        trainers: dict[str, TrainTask] = {}
        for name, task in self._infers.items():
            if isinstance(task, MSAMBundleInferTask):
                trainers[name] = MSAMBundleTrainTask(
                    task.bundle_dir, task.ckpt_path, task.overlays, task.device, limits=self.limits
                )
        return trainers

    def _task(self, tasks: dict[str, Any], model: Any, kind: str) -> Any:
        """The task serving ``model``; 404 naming it and the served ones otherwise."""
        task = tasks.get(model) if isinstance(model, str) else None
        if task is None:
            raise HTTPException(404, f"unknown model {str(model)[:64]!r}: this server has {kind} {sorted(tasks)}")
        return task

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer entry point: the image must be a datastore id (never a path)."""
        return self.run_infer(request)

    def run_infer(
        self,
        request: dict[str, Any],
        upload: str | None = None,
        initial_mask: str | None = None,
        slot_held: bool = False,
    ) -> dict[str, Any]:
        """Segment a datastore image (``request["image"]`` is its id) or an already checked upload, optionally starting
        from an uploaded label (``initial_mask``, a checked temporary file) and saving the mask as the image's label
        ``label_tag``; at most ``max_pending_infers`` run or wait at once (else 429). ``slot_held``: the caller already
        holds a slot (:meth:`infer_slot`, taken before the request's body was read)."""
        task = self._task(self._infers, request.get("model"), "models")
        request = {k: v for k, v in request.items() if k != "initial_mask"}  # a path only ever comes from an upload
        if initial_mask is not None:
            request["initial_mask"] = initial_mask
        save_label = request.get("save_label", False)
        if not isinstance(save_label, bool):
            raise HTTPException(400, f"save_label must be true or false, got {save_label!r}")
        tag = request.get("label_tag", DefaultLabelTag.ORIGINAL.value)
        image_id = request.get("image")
        if upload is not None:
            if save_label:
                raise HTTPException(400, "save_label needs an image from the datastore (?image=<id>), not an upload")
            request["image"] = upload
        else:
            if save_label:
                check_name(tag, "label_tag")
            request["image"] = self.datastore().image_path_of(image_id)
        with contextlib.nullcontext() if slot_held else self.infer_slot():
            out, params = task(request)
        label = out
        if save_label:
            try:
                label = self.datastore().save_label(image_id, out, tag, {"model": task.name, "params": params})
            except BaseException:
                os.remove(out)
                raise
        return {
            "label": label,
            "tag": tag if save_label else DefaultLabelTag.ORIGINAL.value,
            "file": out,
            "params": params,
        }

    @contextlib.contextmanager
    def infer_slot(self) -> Iterator[None]:
        """Hold one of the ``max_pending_infers`` inference slots for the block; 429 at once when none is free."""
        if not self._infer_slots.acquire(blocking=False):
            raise HTTPException(
                429, f"busy: {self.limits.max_pending_infers} inferences running or waiting (--conf max_pending_infers)"
            )
        try:
            yield
        finally:
            self._infer_slots.release()

    def trainer_names(self) -> list[str]:
        """Names of the models that can be trained."""
        return sorted(self._trainers)

    def validate_train_request(self, model: str, params: dict[str, Any]) -> dict[str, Any]:
        """Checked training parameters for ``model`` (404 for an unknown model, 400 naming a bad key)."""
        task = self._task(self._trainers, model, "trainable models")
        return validate_train_params(params, task.limits, internal=())

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's train entry point, with a 404 for an unknown model."""
        self._task(self._trainers, request.get("model"), "trainable models")
        return super().train(request)

    def restore_weights(self, model: str) -> dict[str, Any]:
        """Serve the weights replaced by the last accepted training again (swapping them with the current ones)."""
        return restore_previous(self._task(self._trainers, model, "trainable models").ckpt_path)

    def on_init_complete(self) -> None:
        """In the server, put the app's checked handlers in front of MONAI Label's (see ``lib/routes.py``)."""
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")
        if server is not None and hasattr(server, "app") and not getattr(server.app.state, "msam_routes", False):
            from lib.routes import install

            install(server.app)
            server.app.state.msam_routes = True

    def info(self) -> dict[str, Any]:
        """App info plus the bundle folder served."""
        meta = super().info()
        meta["bundles"] = str(self.bundles_root)
        return meta


if __name__ == "__main__":  # quick offline check: python monailabel_app/main.py <studies>
    logging.basicConfig(level=logging.INFO)
    app = MSAMApp(str(APP_DIR), sys.argv[1] if len(sys.argv) > 1 else os.getcwd(), {})
    print(sorted(app.info()["models"]))
