"""A MONAI Label train task that runs a bundle's own ``train.yaml`` on the datastore's labelled images."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException
from filelock import FileLock, Timeout
from monai.bundle import ConfigWorkflow
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from .guard import Limits, atomic_copy

logger = logging.getLogger(__name__)

TRAIN_DEFAULTS: dict[str, Any] = {"max_epochs": 1, "val_fraction": 0.2}
TRAIN_KEYS = ("max_epochs", "val_fraction", "learning_rate")
INTERNAL_KEYS = ("model", "gpus", "bundle_path", "local_rank")  # added by MONAI Label on the way to the task
MAX_VALUE_CHARS = 64
BACKUP_SUFFIX = ".prev"
# what the server sets in every bundle config it runs, by id: the bundle's initialize then installs no
# process-ending sys.excepthook (the command line's failure report) in the server
SERVER_OVERRIDES: dict[str, Any] = {"install_failure_report": None}


def train_workflow(config_files: list[str], override: dict[str, Any]) -> ConfigWorkflow:
    """The bundle's ``train.yaml`` (plus overlays) as a training ``ConfigWorkflow`` with ``override`` (ids or ``#``
    paths) and :data:`SERVER_OVERRIDES` applied; nothing is initialized yet."""
    return ConfigWorkflow(
        config_file=config_files, workflow_type="train", run_id="training", **{**override, **SERVER_OVERRIDES}
    )


def validate_train_params(
    request: dict[str, Any], limits: Limits, internal: tuple[str, ...] = INTERNAL_KEYS
) -> dict[str, Any]:
    """The training parameters of a request, checked (400 naming the key): ``max_epochs`` an integer in
    1..``max_train_epochs``, ``val_fraction`` a number in (0, 1), ``learning_rate`` a finite number in
    (0, ``max_learning_rate``]; any other key is refused, except the ``internal`` ones MONAI Label adds itself (a
    client's request is checked with none)."""
    for key, value in request.items():
        if key not in TRAIN_KEYS and key not in internal:
            raise HTTPException(400, f"unknown training parameter {str(key)[:64]!r}; allowed: {list(TRAIN_KEYS)}")
        if len(json.dumps(value, default=str)) > MAX_VALUE_CHARS:
            raise HTTPException(413, f"training parameter {key!r} is longer than {MAX_VALUE_CHARS} characters")
    params = {**TRAIN_DEFAULTS, **{k: request[k] for k in TRAIN_KEYS if k in request}}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HTTPException(400, f"training parameter {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise HTTPException(400, f"training parameter {key!r} must be finite, got {value!r}")
    epochs = params["max_epochs"]
    if not isinstance(epochs, int) or not 1 <= epochs <= limits.max_train_epochs:
        raise HTTPException(
            400,
            f"max_epochs must be an integer in 1..{limits.max_train_epochs} (--conf max_train_epochs), got {epochs!r}",
        )
    if not 0 < params["val_fraction"] < 1:
        raise HTTPException(400, f"val_fraction must be in (0, 1), got {params['val_fraction']!r}")
    lr = params.get("learning_rate")
    if lr is not None and not 0 < lr <= limits.max_learning_rate:
        raise HTTPException(
            400,
            f"learning_rate must be in (0, {limits.max_learning_rate:g}] (--conf max_learning_rate), got {lr!r}",
        )
    return params


def labelled_datalist(datastore: Datastore) -> list[dict[str, str]]:
    """Image/label path pairs of every image with a final label in the datastore."""
    items = [d for d in datastore.datalist() if d.get("image") and d.get("label")]
    return [{"image": str(d["image"]), "label": str(d["label"])} for d in items]


def write_dataset_json(items: list[dict[str, str]], folder: Path) -> Path:
    """An MSD-style ``dataset.json`` (absolute paths) that every bundle accepts as its dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.json"
    path.write_text(json.dumps({"name": "monailabel", "labels": {"0": "background", "1": "tumor"}, "training": items}))
    return path


def should_replace(previous: float | None, new: float) -> bool:
    """Serve the new weights only when they score at least as well as the served ones (a NaN score never wins)."""
    if not math.isfinite(new):
        return False
    return previous is None or not math.isfinite(previous) or new >= previous


def backup_path(ckpt_path: Path) -> Path:
    """Where the weights replaced by the last accepted training are kept (``model.pt.prev``)."""
    return ckpt_path.with_name(ckpt_path.name + BACKUP_SUFFIX)


def promote(candidate: Path, ckpt_path: Path) -> Path | None:
    """Keep the served weights as ``<name>.prev`` and serve ``candidate`` (both written atomically)."""
    backup = None
    if ckpt_path.is_file():
        backup = backup_path(ckpt_path)
        atomic_copy(ckpt_path, backup)
    atomic_copy(candidate, ckpt_path)
    return backup


def restore_previous(ckpt_path: Path) -> dict[str, Any]:
    """Swap the served weights with the previous ones, so a second call undoes the first; 404 when there are none."""
    backup = backup_path(ckpt_path)
    if not backup.is_file():
        raise HTTPException(404, f"no previous weights to restore: {backup} does not exist")
    if ckpt_path.is_file():
        swap = ckpt_path.with_name(ckpt_path.name + ".swap")
        os.replace(ckpt_path, swap)
        os.replace(backup, ckpt_path)
        os.replace(swap, backup)
    else:
        os.replace(backup, ckpt_path)
    os.utime(ckpt_path)  # a new modification time makes the infer task reload the weights
    logger.info(f"restored {ckpt_path} from {backup}")
    return {"weights": str(ckpt_path), "previous": str(backup) if backup.is_file() else None}


def score(evaluator: Any, network: torch.nn.Module, weights: Path) -> float:
    """The bundle evaluator's key metric (validation cases, seeded clicks) for ``weights`` loaded into ``network``."""
    from msam_components.networks import load_pretrained

    load_pretrained(network, str(weights))
    evaluator.run()
    return float(evaluator.state.metrics[evaluator.state.key_metric_name])


class MSAMBundleTrainTask(TrainTask):
    """Train (or fine-tune) a bundle on the annotations saved in MONAI Label, through the bundle's train config.

    Labels saved by annotators hold the tumour as value 1 (the app's label map), so ``target_labels`` is 1 here. The
    run starts from the served weights when they exist (fine-tuning) and trains in a work folder. Old and new weights
    are then scored by the bundle's evaluator on the same validation cases and clicks; the new ones are served only if
    they score at least as well, and the replaced ones are kept as ``model.pt.prev`` (``POST /train/<bundle>/restore``
    swaps them back). Request options: ``max_epochs`` (default 1), ``val_fraction`` (default 0.2), ``learning_rate``.
    """

    def __init__(
        self,
        bundle_dir: Path,
        ckpt_path: Path,
        overlays: list[str],
        device: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        """Train ``bundle_dir`` into ``ckpt_path`` (the infer task's weights) within ``limits``."""
        super().__init__(f"Train M-SAM bundle {bundle_dir.name} on the labelled images of the datastore")
        self.bundle_dir, self.ckpt_path, self.overlays, self.device = bundle_dir, ckpt_path, overlays, device
        self.limits = limits or Limits()

    def config(self) -> dict[str, Any]:
        """The options a client may send (the values are the defaults)."""
        return dict(TRAIN_DEFAULTS)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Train, score old and new weights on the same validation cases, serve the new ones only if not worse."""
        params = validate_train_params(request, self.limits)
        items = labelled_datalist(datastore)
        if len(items) < 2:
            raise HTTPException(400, f"training needs at least 2 labelled images in the datastore, found {len(items)}")
        lock = FileLock(str(self.ckpt_path.with_name(self.ckpt_path.name + ".train.lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise HTTPException(
                409, f"a training of {self.bundle_dir.name} is already running; wait for it to finish"
            ) from None
        work = Path(tempfile.mkdtemp(prefix=f"msam_train_{self.bundle_dir.name}_"))
        try:
            return self._train(params, items, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            lock.release()

    def _train(self, params: dict[str, Any], items: list[dict[str, str]], work: Path) -> dict[str, Any]:
        """Train in ``work`` (removed afterwards by the caller), score, and serve the new weights if not worse."""
        write_dataset_json(items, work / "data")
        served = self.ckpt_path.is_file()
        override: dict[str, Any] = {
            "bundle_root": str(self.bundle_dir),
            "dataset_dir": str(work / "data"),
            "output_dir": str(work / "eval"),
            "ckpt_dir": str(work / "ckpt"),
            "target_labels": [1],
            "num_epochs": params["max_epochs"],
            "val_interval": 1,
            "val_fraction": float(params["val_fraction"]),
            "num_workers": 0,
            "pretrained_ckpt": str(self.ckpt_path) if served else "",
        }
        if "learning_rate" in params:
            override["learning_rate"] = float(params["learning_rate"])
        if self.device:
            override["device"] = f"$torch.device('{self.device}')"
        files = [str(self.bundle_dir / "configs" / "train.yaml"), *self.overlays]
        logger.info(f"training {self.bundle_dir.name} on {len(items)} labelled images with {params}")
        try:
            workflow = train_workflow(files, override)
            workflow.initialize()  # without the bundle's failure report (SERVER_OVERRIDES)
            train_cases, val_cases = workflow.parser.get_parsed_content("data_split")
            if not train_cases or not val_cases:
                raise HTTPException(
                    400,
                    f"val_fraction {params['val_fraction']} splits the {len(items)} labelled images into "
                    f"{len(train_cases)} training and {len(val_cases)} validation case(s); both need at least one",
                )
            workflow.run()
            trainer = workflow.parser.get_parsed_content("train#trainer")
            evaluator = workflow.parser.get_parsed_content("validate#evaluator")
            network = workflow.parser.get_parsed_content("network")
            candidate = work / "candidate.pt"
            best = work / "ckpt" / "model.pt"
            if best.is_file():
                shutil.copyfile(best, candidate)
            else:
                torch.save(network.state_dict(), candidate)
            new_metric = score(evaluator, network, candidate)
            previous_metric = score(evaluator, network, self.ckpt_path) if served else None
            workflow.finalize()
        except HTTPException:
            raise
        except Exception as err:  # noqa: BLE001 - report the innermost cause, keep the server serving
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            code = 400 if isinstance(cause, (ValueError, FileNotFoundError)) else 500
            raise HTTPException(code, f"training {self.bundle_dir.name} failed: {cause}") from err
        replaced = should_replace(previous_metric, new_metric)
        backup = promote(candidate, self.ckpt_path) if replaced else None
        stats = {
            "epochs": int(trainer.state.epoch),
            "train_cases": len(train_cases),
            "val_cases": len(val_cases),
            "metric": str(evaluator.state.key_metric_name),
            "previous_metric": previous_metric,
            "new_metric": new_metric,
            "replaced": replaced,
            "weights": str(self.ckpt_path),
            "previous_weights": str(backup) if backup else None,
            "weights_written": replaced,
        }
        verdict = "serving the new weights" if replaced else "kept the served weights (the new ones scored lower)"
        logger.info(f"training {self.bundle_dir.name} finished, {verdict}: {stats}")
        return stats
