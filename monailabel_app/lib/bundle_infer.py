"""A MONAI Label infer task that runs an M-SAM bundle's inference pipeline on user clicks."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from msam_components.transforms.paste import mask_volume

from .bundle_train import SERVER_OVERRIDES
from .file_formats import result_format, write_mask
from .guard import Limits, check_voxels

logger = logging.getLogger(__name__)

CLICK_KEYS = ("foreground", "background")
INITIAL_MASK = "initial_mask"  # the request key of a starting mask (an uploaded label) and the bundle's data key
PREPARED_IMAGES = 2  # preprocessed images kept per task (an annotator works on one image at a time)


def task_overrides(
    bundle_dir: str | os.PathLike, ckpt_path: str | os.PathLike, device: str | None = None
) -> dict[str, Any]:
    """The values the infer task sets in the bundle's ``inference.yaml``, by id (``#`` paths), before anything is parsed.

    The task answers a binary mask in the input's geometry and writes it itself: its ``postprocessing`` is the bundle's
    ``paste_window`` and ``postprocessing_threshold`` (no ``click_instances`` numbering, no ``saver``), and the paste
    thresholds only the window's box when the thresholds keep zero at zero. An uploaded label is in the app's
    convention (lesion = 1). The clicks come under the app's request keys.
    """
    override: dict[str, Any] = {
        "bundle_root": str(bundle_dir),
        "ckpt_path": str(ckpt_path),
        "output_dir": tempfile.gettempdir(),
        "initial_label": [1],
        "click_keys": list(CLICK_KEYS),
        "paste_window#box_only": "$msam_components.transforms.paste.zero_preserving(@postprocessing_threshold)",
        "postprocessing#transforms": "$[@paste_window] + @postprocessing_threshold",
    }
    if device:
        override["device"] = f"$torch.device('{device}')"
    return {**override, **SERVER_OVERRIDES}  # e.g. no process-ending sys.excepthook from the bundle in the server


def task_parser(config_files: Sequence[str], override: dict[str, Any]) -> ConfigParser:
    """The bundle's configs (``inference.yaml`` plus overlays) with the task's ``override`` applied, unparsed."""
    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(override)
    return parser


def bundle_label_name(metadata: dict[str, Any]) -> str:
    """Name of the foreground class from ``network_data_format.outputs.pred.channel_def`` (e.g. "tumor")."""
    channel_def = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
    names = [str(v) for k, v in sorted(channel_def.items(), key=lambda kv: int(kv[0])) if str(v) != "background"]
    return names[0] if names else "foreground"


def _is_index(v: Any) -> bool:
    """A JSON number usable as a voxel index: an int (any size; range is checked later) or a finite whole float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or (np.isfinite(v) and float(v).is_integer())


def validate_clicks(request: dict[str, Any], max_clicks: int | None = None) -> dict[str, list[list[int]]]:
    """Check the request's click lists (JSON voxel indices ``[[i, j, k], ...]``) and raise HTTP 400 naming the fault;
    more than ``max_clicks`` clicks in all answer 413."""
    clicks: dict[str, list[list[int]]] = {}
    for key in CLICK_KEYS:
        value = request.get(key, [])
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise HTTPException(400, f"{key!r} must be a list of [i, j, k] voxel indices, got {type(value).__name__}")
        if max_clicks is not None and len(value) + sum(len(v) for v in clicks.values()) > max_clicks:
            raise HTTPException(413, f"more than {max_clicks} clicks in one request (--conf max_clicks)")
        points = []
        for point in value:
            ok = isinstance(point, (list, tuple)) and len(point) == 3 and all(_is_index(v) for v in point)
            if not ok:
                shown = repr(point) if len(repr(point)) <= 80 else repr(point)[:80] + "..."
                raise HTTPException(400, f"{key!r}: each click must be [i, j, k] integer voxel indices, got {shown}")
            points.append([int(v) for v in point])
        clicks[key] = points
    if not clicks["foreground"] and not clicks["background"]:
        raise HTTPException(400, "no click given: 'foreground' and 'background' are both empty or missing")
    return clicks


def check_clicks_inside(clicks: dict[str, list[list[int]]], shape: Sequence[int]) -> None:
    """Raise HTTP 400 when a click lies outside the image array as stored (``0 <= index < shape`` per axis)."""
    for key, points in clicks.items():
        for point in points:
            if any(not 0 <= v < s for v, s in zip(point, shape)):
                raise HTTPException(400, f"{key!r}: click {point} is outside the image of shape {list(shape)}")


def check_same_grid(mask_path: str, image: nib.Nifti1Image) -> None:
    """Raise HTTP 400 unless the uploaded label is a readable volume on the image's voxel grid (shape and affine)."""
    try:
        mask = nib.load(mask_path)
    except Exception as err:  # noqa: BLE001 - any reader failure is the upload's fault
        raise HTTPException(400, f"cannot read the uploaded label: {err}") from err
    if tuple(mask.shape[:3]) != tuple(image.shape[:3]) or len(mask.shape) > 3 and any(n != 1 for n in mask.shape[3:]):
        raise HTTPException(
            400, f"the uploaded label has shape {list(mask.shape)}, the image {list(image.shape)}: not the same grid"
        )
    if not np.allclose(mask.affine, image.affine, atol=1e-3):
        difference = float(np.abs(mask.affine - image.affine).max())
        raise HTTPException(
            400, f"the uploaded label's affine differs from the image's (by up to {difference:.4g}): not the same grid"
        )


def share_voxels(data: dict[str, Any]) -> dict[str, Any]:
    """A per-request copy of a cached preprocessing result: MetaTensors keep their (large) voxel storage but get their
    own metadata and transform trace, which the click stage appends to; other values are deep-copied."""
    copied = {}
    for k, v in data.items():
        if isinstance(v, MetaTensor):
            trace = copy.deepcopy(v.applied_operations)
            copied[k] = MetaTensor(v.as_tensor(), meta=copy.deepcopy(v.meta), applied_operations=trace)
        else:
            copied[k] = copy.deepcopy(v)
    return copied


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (MONAI's Compose wraps transform errors in RuntimeError)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


class MSAMBundleInferTask(InferTask):
    """Interactive M-SAM segmentation through one bundle's ``configs/inference.yaml`` (plus optional overlays).

    Built from the bundle's config by id only (:func:`task_overrides`): ``preprocessing_image`` (cached per file),
    ``preprocessing_clicks``, ``network``, ``inferer`` (one ``ClickInferer`` per task, so its embedding cache serves
    repeated requests on the same crop) and ``postprocessing`` up to thresholding (the task writes the mask itself,
    with the input's header, as MONAI Label expects).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        ckpt_path: str | os.PathLike | None = None,
        overlays: Sequence[str] = (),
        device: str | None = None,
        max_clicks: int = Limits.max_clicks,
        max_voxels: int = Limits.max_voxels,
    ) -> None:
        """Read the bundle's metadata; the network is built on the first request (server start stays fast)."""
        self.bundle_dir = Path(bundle_dir).resolve()
        self.name = self.bundle_dir.name
        self.overlays = [str(o) for o in overlays]
        self.config_files = [str(self.bundle_dir / "configs" / "inference.yaml"), *self.overlays]
        self.metadata = json.loads((self.bundle_dir / "configs" / "metadata.json").read_text())
        self.ckpt_path = Path(ckpt_path) if ckpt_path else self.bundle_dir / "models" / "model.pt"
        self.device = device
        self.limits = Limits(max_clicks=max_clicks, max_voxels=max_voxels)
        self.label_name = bundle_label_name(self.metadata)
        self._lock = threading.Lock()
        self._parts: dict[str, Any] | None = None
        super().__init__(
            type=InferType.DEEPGROW,
            labels={self.label_name: 1},
            dimension=3,
            description=f"{self.metadata.get('name', self.name)}: {self.label_name} from foreground/background clicks",
            config={
                "bundle": str(self.bundle_dir),
                "configs": ", ".join(self.config_files),
                "weights": str(self.ckpt_path),
                "weights_available": self.ckpt_path.is_file(),
            },
        )

    def info(self) -> dict[str, Any]:
        """Task info for /info/, including whether the weights file exists (checked now, not at start)."""
        self._config["weights_available"] = self.ckpt_path.is_file()
        info = super().info()
        if not self.ckpt_path.is_file():
            info["description"] += f" [no weights: put a checkpoint at {self.ckpt_path}]"
        return info

    def is_valid(self) -> bool:
        """Always listed, so clients see the task and its missing weights instead of nothing."""
        return True

    def get_path(self, validate: bool = True) -> str | None:
        """Path of the weights file (None when it does not exist and ``validate`` is set)."""
        return str(self.ckpt_path) if (self.ckpt_path.is_file() or not validate) else None

    def _build(self) -> dict[str, Any]:
        """Parse the bundle configs once: preprocessing, network with weights, inferer, thresholding postprocessing."""
        mtime = self.ckpt_path.stat().st_mtime_ns if self.ckpt_path.is_file() else None
        if self._parts is not None and self._parts["mtime"] == mtime:
            return self._parts
        if not self.ckpt_path.is_file():
            raise HTTPException(
                503,
                f"model '{self.name}' has no weights: expected a checkpoint at {self.ckpt_path} "
                f"(put one there or start the server with --conf {self.name}_ckpt /path/to/model.pt)",
            )
        # every value is set before anything is parsed: the postprocessing's paste inverts the very preprocessing
        # instances that the two stages below run (the bundle's preprocessing is preprocessing_image + _clicks)
        parser = task_parser(self.config_files, task_overrides(self.bundle_dir, self.ckpt_path, self.device))
        self._parts = {  # rebuilt when the weights file changes (e.g. after training from MONAI Label)
            "mtime": mtime,
            "device": parser.get_parsed_content("device"),
            "pixdim": parser.get_parsed_content("pixdim"),
            "preprocessing": parser.get_parsed_content("preprocessing"),
            "image_stage": Compose(parser.get_parsed_content("preprocessing_image")),
            "click_stage": Compose(parser.get_parsed_content("preprocessing_clicks")),
            "prepared_images": OrderedDict(),
            "network": parser.get_parsed_content("network"),
            "inferer": parser.get_parsed_content("inferer"),
            "postprocessing": parser.get_parsed_content("postprocessing"),
        }
        logger.info(f"M-SAM task {self.name}: loaded {self.ckpt_path} from {self.config_files}")
        return self._parts

    @staticmethod
    def _preprocess(
        parts: dict[str, Any], image_path: str, clicks: dict[str, Any], mask_path: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """The bundle's preprocessing; its image-only stage is cached per file (path, mtime, size), so a click on the
        same image skips loading, reorientation and resampling. A starting mask (``mask_path``, already checked to be
        on the image's grid) goes through the image stage with its image (which refreshes the cache), then is cropped
        with the image. Returns the data and whether the cache served the image."""
        stat = os.stat(image_path)
        key = (image_path, stat.st_mtime_ns, stat.st_size)
        cache = parts["prepared_images"]
        cached = key in cache and not mask_path
        mask = {}
        if not cached:
            prepared = parts["image_stage"]({"image": image_path, **({INITIAL_MASK: mask_path} if mask_path else {})})
            mask = {INITIAL_MASK: prepared.pop(INITIAL_MASK)} if mask_path else {}
            cache[key] = prepared
            while len(cache) > PREPARED_IMAGES:
                cache.popitem(last=False)
        cache.move_to_end(key)
        data = parts["click_stage"]({**share_voxels(cache[key]), **mask, **clicks})
        return {k: v.clone() if isinstance(v, MetaTensor) else v for k, v in data.items()}, cached  # no cache views

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segment ``request["image"]`` from its clicks; return a temporary mask file in the input's geometry, in the
        format the request asks for (``result_extension`` .nii.gz/.nii/.nrrd, ``result_dtype``, ``result_compress``)."""
        clicks = validate_clicks(request, self.limits.max_clicks)
        result_ext, result_dtype, result_compress = result_format(request)  # checked before any work (400 if unknown)
        image_path = request.get("image")
        if not isinstance(image_path, str) or not os.path.isfile(image_path):
            raise HTTPException(404, f"image not found in the datastore: {request.get('image')!r}")
        try:
            header_img = nib.load(image_path)
        except Exception as err:  # noqa: BLE001 - any reader failure is the input's fault
            raise HTTPException(400, f"cannot read image {os.path.basename(image_path)}: {err}") from err
        check_clicks_inside(clicks, header_img.shape[:3])
        mask_path = request.get(INITIAL_MASK)
        if mask_path is not None:
            check_same_grid(mask_path, header_img)
        what = f"image {os.path.basename(image_path)}"
        check_voxels(header_img.shape, header_img.header.get_zooms(), self.limits, what)
        with self._lock:
            start = time.perf_counter()
            parts = self._build()
            check_voxels(header_img.shape, header_img.header.get_zooms(), self.limits, what, parts["pixdim"])
            loaded = time.perf_counter()
            misses = parts["inferer"].cache.misses
            try:
                data, image_cached = self._preprocess(parts, image_path, clicks, mask_path)
            except Exception as err:  # noqa: BLE001 - map the input's faults to 4xx, the rest to 5xx
                cause = _root_cause(err)
                code = 400 if isinstance(cause, ValueError) else 500
                raise HTTPException(code, f"preprocessing failed: {cause}") from err
            prepared = time.perf_counter()
            device = parts["device"]
            start_mask = data[INITIAL_MASK][None].to(device) if INITIAL_MASK in data else None
            with torch.no_grad():
                pred = parts["inferer"](
                    data["image"][None].to(device),
                    parts["network"],
                    data["foreground"][None].to(device),
                    data["background"][None].to(device),
                    initial_mask=start_mask,
                    click_windows=data.get("click_windows"),
                    click_groups=data.get("click_groups"),
                )
            data["pred"] = pred[0].detach().to("cpu")
            predicted = time.perf_counter()
            data["image"] = data["image"].to("cpu")
            data = parts["postprocessing"](data)
            mask = mask_volume(data["pred"])  # uint8, Fortran order: nibabel writes it without a transposing copy
            encoder_ran = parts["inferer"].cache.misses > misses
            decode_steps = getattr(parts["inferer"], "last_decode_steps", None)
            latency, load = time.perf_counter() - start, loaded - start
        if mask.shape != tuple(header_img.shape[:3]):
            raise HTTPException(500, f"mask shape {mask.shape} differs from the image's {header_img.shape[:3]}")
        out = tempfile.NamedTemporaryFile(suffix=result_ext, prefix=f"{self.name}_", delete=False).name
        saving = time.perf_counter()
        write_mask(out, mask, header_img, result_dtype, result_compress)  # the asked format, in the input's geometry
        seconds = {"total": latency, "model_load": load, "preprocess": prepared - loaded, "model": predicted - prepared}
        # the phases of "total" (which ends before the mask is written), and the NIfTI write
        seconds |= {"postprocess": start + latency - predicted, "save": time.perf_counter() - saving}
        params = {
            "model": self.name,
            "label_names": {self.label_name: 1},
            "foreground": clicks["foreground"],
            "background": clicks["background"],
            "encoder_ran": encoder_ran,
            "decode_steps": decode_steps,
            "image_cached": image_cached,
            "initial_mask_voxels": None if start_mask is None else int((start_mask > 0).sum()),  # in the model window
            "latency": {k: round(v, 4) for k, v in seconds.items()},
        }
        logger.info(
            f"M-SAM {self.name}: {latency:.3f}s, encoder {'ran' if encoder_ran else 'cached'}, "
            f"{decode_steps} decode step(s), {mask.sum()} vox"
        )
        return out, params
