"""A MONAI Label train task that runs a bundle's own ``train.yaml`` on the datastore's labelled images."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monai.bundle import ConfigWorkflow
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


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


class MSAMBundleTrainTask(TrainTask):
    """Train (or fine-tune) a bundle on the annotations saved in MONAI Label, through the bundle's train config.

    Labels saved by annotators hold the tumour as value 1 (the app's label map), so ``target_labels`` is 1 here. The
    run starts from the served weights when they exist (fine-tuning) and writes the best ``model.pt`` back to where the
    infer task reads it, which reloads it on its next request. Request options: ``max_epochs`` (default 1),
    ``val_fraction`` (default 0.2), ``learning_rate``.
    """

    def __init__(self, bundle_dir: Path, ckpt_path: Path, overlays: list[str], device: str | None = None) -> None:
        super().__init__(f"Train M-SAM bundle {bundle_dir.name} on the labelled images of the datastore")
        self.bundle_dir, self.ckpt_path, self.overlays, self.device = bundle_dir, ckpt_path, overlays, device

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 1, "val_fraction": 0.2, "weights": str(self.ckpt_path)}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        items = labelled_datalist(datastore)
        if len(items) < 2:
            raise HTTPException(400, f"training needs at least 2 labelled images in the datastore, found {len(items)}")
        max_epochs = request.get("max_epochs", 1)
        if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
            raise HTTPException(400, f"max_epochs must be a positive integer, got {max_epochs!r}")
        work = Path(tempfile.mkdtemp(prefix=f"msam_train_{self.bundle_dir.name}_"))
        write_dataset_json(items, work / "data")
        override: dict[str, Any] = {
            "bundle_root": str(self.bundle_dir),
            "dataset_dir": str(work / "data"),
            "output_dir": str(work / "eval"),
            "ckpt_dir": str(self.ckpt_path.parent),
            "target_labels": [1],
            "num_epochs": max_epochs,
            "val_interval": 1,
            "val_fraction": float(request.get("val_fraction", 0.2)),
            "num_workers": 0,
            "pretrained_ckpt": str(self.ckpt_path) if self.ckpt_path.is_file() else "",
        }
        if "learning_rate" in request:
            override["learning_rate"] = float(request["learning_rate"])
        if self.device:
            override["device"] = f"$torch.device('{self.device}')"
        if self.ckpt_path.name != "model.pt":  # the bundle's CheckpointSaver writes model.pt into ckpt_dir
            override["validate#handlers#3#key_metric_filename"] = self.ckpt_path.name  # the CheckpointSaver
        files = [str(self.bundle_dir / "configs" / "train.yaml"), *self.overlays]
        logger.info(f"training {self.bundle_dir.name} on {len(items)} labelled images for {max_epochs} epoch(s)")
        try:
            workflow = ConfigWorkflow(config_file=files, workflow_type="train", run_id="training", **override)
            workflow.initialize()
            workflow.run()
            trainer = workflow.parser.get_parsed_content("train#trainer")
            evaluator = workflow.parser.get_parsed_content("validate#evaluator")
            workflow.finalize()
        except Exception as err:  # noqa: BLE001 - report the innermost cause, keep the server serving
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            code = 400 if isinstance(cause, (ValueError, FileNotFoundError)) else 500
            raise HTTPException(code, f"training {self.bundle_dir.name} failed: {cause}") from err
        stats = {
            "epochs": int(trainer.state.epoch),
            "train_cases": len(workflow.parser.get_parsed_content("data_split")[0]),
            "best_metric": float(evaluator.state.best_metric),
            "weights": str(self.ckpt_path),
            "weights_written": self.ckpt_path.is_file(),
            "work_dir": str(work),
        }
        logger.info(f"training {self.bundle_dir.name} finished: {stats}")
        return stats
