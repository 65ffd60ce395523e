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
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.bundle_infer import MSAMBundleInferTask  # noqa: E402
from lib.bundle_train import MSAMBundleTrainTask  # noqa: E402

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
        self.bundles_root = Path(conf.get("bundles", APP_DIR.parent / "bundles")).expanduser().resolve()
        self.bundle_dirs = discover_bundles(self.bundles_root, conf.get("models", "all"))
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
                trainers[name] = MSAMBundleTrainTask(task.bundle_dir, task.ckpt_path, task.overlays, task.device)
        return trainers

    def info(self) -> dict[str, Any]:
        """App info plus the bundle folder served."""
        meta = super().info()
        meta["bundles"] = str(self.bundles_root)
        return meta


if __name__ == "__main__":  # quick offline check: python monailabel_app/main.py <studies>
    logging.basicConfig(level=logging.INFO)
    app = MSAMApp(str(APP_DIR), sys.argv[1] if len(sys.argv) > 1 else os.getcwd(), {})
    print(sorted(app.info()["models"]))
