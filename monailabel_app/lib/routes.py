"""The app's own handlers for MONAI Label's write and compute endpoints, placed in front of the stock ones.

MONAI Label 0.8.5 runs ``/infer`` synchronously on the server's event loop (one inference stalls every endpoint),
keeps rejected uploads in the temp folder, passes ids, tags and params through unchecked, and starts training before
looking at its parameters. These handlers take the same URLs and arguments, check everything first, run the heavy
work in the server's worker threads and always remove their temporary files.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Optional

from fastapi import APIRouter, BackgroundTasks, FastAPI, File, Form, HTTPException, Request, UploadFile
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask
from starlette.concurrency import run_in_threadpool

from . import stock_routes
from .file_formats import label_as_nifti, label_extension
from .guard import NIFTI_EXTENSIONS, check_name, check_volume, nifti_extension, parse_params, save_upload

logger = logging.getLogger(__name__)

RESERVED_INFER_KEYS = ("model", "image", "file", "label", "session", "session_id", "initial_mask")
TRAIN_BODY_BYTES = 1 << 20  # read whole, so an oversized parameter is refused by name


def _remove(path: Any) -> None:
    """Remove a result file if it is one (no error when it is gone)."""
    if isinstance(path, str) and os.path.isfile(path):
        os.remove(path)


def build_router() -> APIRouter:
    """Handlers that call the current M-SAM app instance (``MSAMApp``; MONAI Label's ``/reload`` replaces it)."""
    router = APIRouter()
    user_role, annotator_role, admin_role = stock_routes.role_dependencies()

    @router.post("/infer/{model}", summary="Run inference (M-SAM: checked, in a worker thread)")
    async def infer(
        request: Request,
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        output: Optional[ResultType] = None,
        user: User = user_role,
    ) -> Any:
        """Segment a datastore image (``?image=<id>``) or an uploaded NIfTI from the clicks in the form's ``params``;
        with a ``label`` upload (on the image's grid, lesion = 1) the clicks edit that mask instead of starting empty.

        The request takes one of the ``max_pending_infers`` slots before its body is read, so a busy server answers 429
        without reading or decoding any upload."""
        app = app_instance()
        if session_id:
            raise HTTPException(400, "sessions are not supported by this app: put the image into the datastore first")
        if output == ResultType.dicom_seg:
            raise HTTPException(400, "output 'dicom_seg' is not served: save the label as 'final' to store a DICOM-SEG")
        with app.infer_slot():
            form = await _read_form(request)
            try:
                params, file, label = form.get("params", "{}"), form.get("file"), form.get("label")
                if not isinstance(params, str):
                    raise HTTPException(400, "form field 'params' must be a JSON string, not a file")
                for name, value in (("file", file), ("label", label)):
                    if value is not None and not hasattr(value, "filename"):
                        raise HTTPException(400, f"form field {name!r} must be a file upload")
                result = await run_in_threadpool(_infer, app, model, image, params, file, label)
            finally:
                if hasattr(form, "close"):
                    await form.close()
        try:
            return send_response(app.datastore(), result, output, background_tasks)
        except BaseException:
            _remove(result.get("file"))
            raise

    def _infer(app: Any, model: str, image: str, params: str, file: Any, label: Any) -> dict[str, Any]:
        """Check the params and uploads, then segment (in a worker thread, inside the caller's slot)."""
        request = parse_params(params, app.limits)
        for key in RESERVED_INFER_KEYS:
            if key in request:
                raise HTTPException(400, f"params may not set {key!r}: give the model in the URL, the image as ?image=")
        request.update(model=model, image=image)
        with tempfile.TemporaryDirectory(prefix="msam_infer_") as folder:
            upload = initial_mask = None
            if file is not None:
                ext = nifti_extension(file.filename, "uploaded image")
                upload = save_upload(file.file, _subfolder(folder, "image"), ext, app.limits, "uploaded image")
                check_volume(upload, app.limits, f"uploaded image {os.path.basename(file.filename or '')!r}")
            elif not image:
                raise HTTPException(400, "give an image id from the datastore (?image=<id>) or upload a NIfTI file")
            if label is not None:  # "edit the current label": the clicks correct this mask instead of an empty one
                ext = label_extension(label.filename, "uploaded label")
                sub = _subfolder(folder, "label")
                initial_mask = save_upload(label.file, sub, ext, app.limits, "uploaded label")
                if ext not in NIFTI_EXTENSIONS:  # a client's NRRD or raw labelmap: on the datastore image's grid
                    if upload is not None:
                        raise HTTPException(415, "with an uploaded image, the label must be a NIfTI file")
                    grid = app.datastore().image_path_of(image)
                    initial_mask = label_as_nifti(initial_mask, ext, grid, sub, app.limits, "uploaded label")
                check_volume(initial_mask, app.limits, f"uploaded label {os.path.basename(label.filename or '')!r}")
            return app.run_infer(request, upload=upload, initial_mask=initial_mask, slot_held=True)

    def add_image(image: Optional[str], params: str, file: UploadFile, user: User) -> dict[str, Any]:
        """Store an uploaded NIfTI volume under a checked id."""
        app = app_instance()
        info = parse_params(params, app.limits)
        ext = nifti_extension(file.filename, "uploaded image")
        image_id = image if image else os.path.basename(file.filename or "")[: -len(ext)]
        check_name(image_id, "image id")
        if user and user.username:
            info["user"] = user.username
        with tempfile.TemporaryDirectory(prefix="msam_upload_") as folder:
            path = save_upload(file.file, folder, ext, app.limits, f"image {image_id!r}")
            return {"image": app.datastore().add_image(image_id, path, info)}

    @router.put("/datastore/image", summary="Upload a new image (M-SAM: checked)")
    @router.put("/datastore/", include_in_schema=False)  # MONAI Label's deprecated alias of /datastore/image
    def put_image(
        image: Optional[str] = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = annotator_role,
    ) -> dict[str, Any]:
        """Checked ``PUT /datastore/image`` (and its deprecated alias ``PUT /datastore/``)."""
        return add_image(image, params, file, user)

    @router.put("/datastore/label", summary="Save a finished label (M-SAM: checked)")
    def put_label(
        image: str,
        params: str = Form("{}"),
        tag: str = DefaultLabelTag.FINAL.value,
        label: UploadFile = File(...),
        user: User = annotator_role,
    ) -> dict[str, Any]:
        """Store an uploaded label for a datastore image under a checked tag."""
        app = app_instance()
        info = parse_params(params, app.limits)
        tag = tag or DefaultLabelTag.FINAL.value
        check_name(tag, "label tag")
        datastore = app.datastore()
        image_path = datastore.image_path_of(image)
        ext = label_extension(label.filename, "uploaded label")
        if user and user.username:
            info["user"] = user.username
        what = f"label {tag!r} of image {image!r}"
        with tempfile.TemporaryDirectory(prefix="msam_upload_") as folder:
            path = save_upload(label.file, folder, ext, app.limits, what)
            path = label_as_nifti(path, ext, image_path, folder, app.limits, what)  # NRRD (Slicer), label.bin (OHIF)
            label_id = datastore.save_label(image, path, tag, info)
        res = app.on_save_label(image, label_id) or {}
        res.update({"image": image, "label": label_id})
        return res

    async def start_training(model: str, params: dict[str, Any], run_sync: bool, enqueue: bool) -> Any:
        """Validate, then run (``run_sync``) or queue one bundle's training in a worker thread."""
        clean = app_instance().validate_train_request(model, params)
        res, detail = await run_in_threadpool(
            AsyncTask.run, "train", request={"model": model}, params=clean, force_sync=run_sync, enqueue=enqueue
        )
        if res is None:
            raise HTTPException(429, detail)
        return res

    @router.post("/train/{model}", summary="Train one model (M-SAM: checked parameters)")
    async def train(
        model: str, request: Request, run_sync: bool = False, enqueue: bool = False, user: User = admin_role
    ) -> Any:
        """Checked ``POST /train/<model>``: the body is a JSON object of training parameters."""
        params = parse_params(await request.body(), app_instance().limits, "training parameters", TRAIN_BODY_BYTES)
        return await start_training(model, params, run_sync, enqueue)

    @router.post("/train/", include_in_schema=False)
    async def train_named(request: Request, run_sync: bool = False, user: User = admin_role) -> Any:
        """Checked ``POST /train/``: the body maps the models to train to their parameters; only those are trained.

        Every name and every parameter is checked before any training starts (404 for a model this server does not
        train, 400 for an empty body or bad parameters)."""
        app = app_instance()
        params = parse_params(await request.body(), app.limits, "training parameters", TRAIN_BODY_BYTES)
        if not params:
            raise HTTPException(
                400, f'name the models to train: a JSON object such as {{"{app.trainer_names()[0]}": {{}}}}'
            )
        for model, given in params.items():
            if model not in app.trainer_names():
                raise HTTPException(404, f"unknown model {str(model)[:64]!r}: trainable models {app.trainer_names()}")
            if not isinstance(given, dict):
                raise HTTPException(400, f"training parameters of {model!r} must be a JSON object")
            app.validate_train_request(model, given)
        result = {}
        for model, given in params.items():
            result[model] = {"result": await start_training(model, given, run_sync, True), "detail": None}
        return result

    @router.post("/train/{model}/restore", summary="Serve the weights that the last accepted training replaced")
    def restore(model: str, user: User = admin_role) -> dict[str, Any]:
        """Swap a model's served weights with the previous ones (``model.pt`` <-> ``model.pt.prev``)."""
        return app_instance().restore_weights(model)

    return router


def _subfolder(folder: str, name: str) -> str:
    """A fresh folder inside the request's temporary folder (each upload in its own, so names never collide)."""
    path = os.path.join(folder, name)
    os.mkdir(path)
    return path


async def _read_form(request: Request) -> Any:
    """The multipart form of a request (files spooled to disk by Starlette), with a clear 400 when it is malformed."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return {}
    try:
        return await request.form(max_files=2, max_fields=16)
    except Exception as err:  # noqa: BLE001 - a malformed or truncated multipart body is the client's fault
        raise HTTPException(400, f"the request's form data could not be read: {err}") from None


def install(fastapi_app: FastAPI) -> None:
    """Put the app's handlers in front of MONAI Label's routes with the same paths (routes match first-come)."""
    router = build_router()
    router.include_router(stock_routes.build_router())
    before = len(fastapi_app.router.routes)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    ours = fastapi_app.router.routes[before:]
    del fastapi_app.router.routes[before:]
    fastapi_app.router.routes[0:0] = ours
    fastapi_app.openapi_schema = None
    logger.info(f"M-SAM: checked handlers for {sorted({getattr(r, 'path', '') for r in router.routes})}")
