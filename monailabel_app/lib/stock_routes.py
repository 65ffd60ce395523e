"""Checked or closed versions of the MONAI Label endpoints this app does not otherwise replace.

MONAI Label 0.8.5's stock handlers for sessions, model files, whole-slide and batch inference, scoring, active
learning and the datastore's info, delete and dataset endpoints trust their input: a session upload unpacks a tar
anywhere on disk, ``PUT /model`` overwrites the served weights with any bytes, the WSI endpoints answer an existing host
path differently from a missing one, and unknown ids end in bare 500s. Each is replaced here by a handler that either
does the job with every argument checked (4xx naming the field) or refuses it with a 4xx saying why and what to use.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from typing import Any, Optional

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from starlette.background import BackgroundTask

from .guard import check_name, parse_params

logger = logging.getLogger(__name__)

SESSIONS_OFF = (
    "sessions are disabled in this app (a session upload could unpack files outside its folder): add the image to "
    "the datastore with PUT /datastore/image, or send it with the infer request as a file upload"
)
MODEL_FILES_READ_ONLY = (
    "served weights cannot be replaced or deleted over HTTP in this app: POST /train/{model} trains new weights and "
    "serves them only if they score at least as well (POST /train/{model}/restore undoes it); or replace the weights "
    "file on disk (--conf {model}_ckpt)"
)
NO_WSI = "whole-slide (WSI) inference is not served by this app: its models segment 3-D volumes from clicks"
NO_BATCH = (
    "batch inference is not served by this app: its models are interactive and need clicks for each image; "
    "use POST /infer/{model}?image=<id> with foreground/background clicks"
)


def _known_model(model: str, tasks: dict[str, Any], kind: str) -> None:
    """404 naming ``model`` and the served ones unless ``model`` is one of ``tasks``."""
    if model not in tasks:
        raise HTTPException(404, f"unknown model {str(model)[:64]!r}: this server has {kind} {sorted(tasks)}")


def _known_label(label: str, tag: str) -> None:
    """400 for a bad id or tag, 404 unless the datastore has that label."""
    check_name(label, "label id")
    check_name(tag, "label tag")
    if not app_instance().datastore().get_label_uri(label, tag):
        raise HTTPException(404, f"label {label!r} with tag {tag!r} not found in the datastore")


def role_dependencies() -> tuple[Any, Any, Any]:
    """MONAI Label's user, annotator and admin role checks as FastAPI dependencies (as its own endpoints use them)."""
    roles = (settings.MONAI_LABEL_AUTH_ROLE_USER, settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)
    return tuple(Depends(RBAC(role)) for role in (*roles, settings.MONAI_LABEL_AUTH_ROLE_ADMIN))


def build_router() -> APIRouter:
    """The checked or closed stock endpoints (placed in front of MONAI Label's by ``routes.install``)."""
    router = APIRouter()
    user_role, annotator_role, admin_role = role_dependencies()

    @router.put("/session/", summary="Sessions are disabled in this app")
    @router.get("/session/{session_id}", include_in_schema=False)
    @router.delete("/session/{session_id}", include_in_schema=False)
    def session(user: User = user_role) -> None:
        """Refuse every session call before its body is read (403)."""
        raise HTTPException(403, SESSIONS_OFF)

    @router.put("/model/{model}", summary="Served weights are read-only over HTTP in this app")
    @router.delete("/model/{model}", include_in_schema=False)
    def model_file(model: str, user: User = admin_role) -> None:
        """404 for an unknown model, else 403: weights change only through checked training or on disk."""
        _known_model(model, app_instance()._infers, "models")
        raise HTTPException(403, MODEL_FILES_READ_ONLY.replace("{model}", model))

    @router.post("/infer/wsi/{model}", include_in_schema=False)
    @router.post("/infer/wsi_v2/{model}", summary="Not served by this app")
    def wsi(model: str, user: User = user_role) -> None:
        """The same 404 for every request, whatever it names (no answer depends on the host's files)."""
        raise HTTPException(404, NO_WSI)

    @router.post("/batch/infer/{model}", summary="Not served by this app (interactive models)")
    def batch_infer(model: str, user: User = admin_role) -> None:
        """404 for an unknown model, else 400 saying why and what to use instead."""
        _known_model(model, app_instance()._infers, "models")
        raise HTTPException(400, NO_BATCH.replace("{model}", model))

    @router.post("/scoring/", include_in_schema=False)
    @router.post("/scoring/{method}", summary="Run a scoring method (M-SAM: checked)")
    def scoring(method: str = "", user: User = annotator_role) -> None:
        """This app has no scoring methods: 404 naming the one asked for."""
        methods = sorted(getattr(app_instance(), "_scoring_methods", {}) or {})
        raise HTTPException(404, f"no scoring method {method[:64]!r}: this app has {methods}")

    @router.post("/activelearning/{strategy}", summary="Next image to annotate (M-SAM: checked)")
    async def next_sample(strategy: str, request: Request, user: User = user_role) -> dict[str, Any]:
        """The next image by a served strategy; 404 for an unknown strategy, ``{}`` when no image is left."""
        app = app_instance()
        strategies = getattr(app, "_strategies", {}) or {}
        if strategy not in strategies:
            raise HTTPException(404, f"unknown strategy {strategy[:64]!r}: this app has {sorted(strategies)}")
        params = parse_params(await request.body(), app.limits, "active learning parameters")
        result = app.next_sample({**params, "strategy": strategy})
        if not result:
            return {}
        info = app.datastore().get_image_info(result["id"])
        return {**result, **info}

    @router.delete("/datastore/image", summary="Remove an image and its labels (M-SAM: checked)")
    @router.delete("/datastore/", include_in_schema=False)
    def remove_image(id: str, user: User = admin_role) -> dict[str, Any]:
        """400 for a bad id, 404 for one not in the datastore."""
        datastore = app_instance().datastore()
        datastore.image_path_of(id)
        datastore.remove_image(id)
        return {}

    @router.put("/datastore/image/info", summary="Update image info (M-SAM: checked)")
    def put_image_info(image: str, info: str = Form("{}"), user: User = annotator_role) -> dict[str, Any]:
        """Merge a JSON object into an image's info; 400 for a bad id or info, 404 for an unknown image."""
        app = app_instance()
        values = parse_params(info, app.limits, "info")
        app.datastore().image_path_of(image)
        if user and user.username:
            values["user"] = user.username
        app.datastore().update_image_info(image, values)
        return {}

    @router.put("/datastore/label/info", summary="Update label info (M-SAM: checked)")
    def put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = annotator_role) -> dict[str, Any]:
        """Merge a JSON object into a label's info; 400 for a bad id, tag or info, 404 for an unknown label."""
        return _update_label_info(label, tag, info, user)

    @router.put("/datastore/updatelabelinfo", include_in_schema=False)
    def update_label_info(
        label: str, tag: str, params: str = Form("{}"), user: User = annotator_role
    ) -> dict[str, Any]:
        """MONAI Label's deprecated alias of ``PUT /datastore/label/info`` (the info comes as ``params``)."""
        return _update_label_info(label, tag, params, user)

    def _update_label_info(label: str, tag: str, text: str, user: Optional[User]) -> dict[str, Any]:
        app = app_instance()
        values = parse_params(text, app.limits, "info")
        _known_label(label, tag)
        if user and user.username:
            values["user"] = user.username
        app.datastore().update_label_info(label, tag, values)
        return {}

    @router.get("/datastore/dataset", summary="Download the labelled images as a ZIP archive (M-SAM: checked)")
    def dataset(limit_cases: Optional[int] = None, user: User = annotator_role) -> FileResponse:
        """The datastore's labelled images (only files inside the studies folder), removed once sent."""
        if limit_cases is not None and limit_cases < 1:
            raise HTTPException(400, f"limit_cases must be a positive integer, got {limit_cases}")
        items = app_instance().datastore().datalist()[: limit_cases or None]
        if not items:
            raise HTTPException(404, "no labelled image in the datastore to put into a dataset archive")
        fd, path = tempfile.mkstemp(prefix="msam_dataset_", suffix=".zip")
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(out, "w") as archive:
                for item in items:
                    for key in ("image", "label"):
                        archive.write(item[key], arcname=f"{key}/{os.path.basename(item[key])}")
        except BaseException:
            os.remove(path)
            raise
        return FileResponse(
            path, media_type="application/zip", filename="dataset.zip", background=BackgroundTask(os.remove, path)
        )

    return router
