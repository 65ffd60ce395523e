"""Per-lesion measures of an evaluation: which lesions were found, which missed, which predicted objects are false.

Whole-volume Dice hides a missed small lesion behind a large one. With several lesions per scan an annotator wants to
know the lesions found (a predicted object overlaps them), missed, and the predicted objects that overlap no lesion,
and each lesion's own Dice. ``lesion_detection`` computes them for one case from connected components (26-connected);
``LesionMetricsHandler`` collects them over an evaluation (across ranks) and writes ``lesion_metrics.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import numpy as np
import torch
from monai.handlers import from_engine
from monai.utils import convert_to_numpy
from scipy import ndimage

from ..io import atomic_write
from .interaction import binarise

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["LESION_METRICS_NAME", "LesionMetricsHandler", "lesion_detection", "summarise_lesions"]

LESION_METRICS_NAME = "lesion_metrics.json"
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def lesion_detection(pred: np.ndarray, label: np.ndarray) -> dict[str, Any]:
    """Lesion-level results of one case (binary ``[D, H, W]`` prediction and label).

    Returns ``found``/``missed`` (lesions overlapped / not overlapped by the prediction), ``false`` (predicted objects
    overlapping no lesion) and ``lesion_dice``: per lesion, the Dice of the lesion against the predicted objects that
    overlap it (0 for a missed lesion).
    """
    pred, label = np.asarray(pred) > 0, np.asarray(label) > 0
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
    lesions, num_lesions = ndimage.label(label, structure=_CONNECTIVITY)
    objects, num_objects = ndimage.label(pred, structure=_CONNECTIVITY)
    touching = np.unique(objects[label & pred])  # predicted objects that overlap some lesion
    dice = []
    for index in range(1, num_lesions + 1):
        lesion = lesions == index
        hits = np.unique(objects[lesion & pred])
        matched = np.isin(objects, hits[hits > 0])
        dice.append(float(2 * (lesion & matched).sum() / (lesion.sum() + matched.sum())))
    found = sum(d > 0 for d in dice)
    return {
        "found": int(found),
        "missed": int(num_lesions - found),
        "false": int(num_objects - np.count_nonzero(touching)),
        "lesion_dice": dice,
    }


def summarise_lesions(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over cases: lesions found/missed, false objects, detection rate and mean per-lesion Dice."""
    found = sum(c["found"] for c in cases)
    missed = sum(c["missed"] for c in cases)
    dice = [d for c in cases for d in c["lesion_dice"]]
    return {
        "num_cases": len(cases),
        "num_lesions": found + missed,
        "lesions_found": found,
        "lesions_missed": missed,
        "false_lesions": sum(c["false"] for c in cases),
        "detection_rate": found / (found + missed) if found + missed else None,
        "false_lesions_per_case": sum(c["false"] for c in cases) / len(cases) if cases else None,
        "mean_lesion_dice": float(np.mean(dice)) if dice else None,
        "policy": "lesions and predicted objects are 26-connected components of the label and of the last click's "
        "binarised prediction; a lesion is found when a predicted object overlaps it, a predicted object is false "
        "when it overlaps no lesion; per-lesion Dice is against the objects overlapping that lesion (0 when missed)",
    }


class LesionMetricsHandler:
    """Ignite handler: per-lesion detection and Dice of the final prediction, written to ``lesion_metrics.json``.

    Reads ``(pred, label)`` with ``output_transform`` (default: the engine output's ``pred`` and ``label``, batched or
    decollated), binarises ``pred`` as the click loop does (``threshold`` on ``threshold_on``), and at the end of the
    epoch gathers the cases of every rank, writes the summary and puts ``lesion_detection_rate``,
    ``false_lesions_per_case`` and ``mean_lesion_dice`` into ``engine.state.metrics``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None,
        threshold: float = 0.5,
        threshold_on: str = "logits",
        output_transform: Callable[[Any], tuple[Any, Any]] = from_engine(["pred", "label"]),
    ) -> None:
        binarise(torch.zeros(1), threshold, threshold_on)  # validates both
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.threshold, self.threshold_on = threshold, threshold_on
        self.output_transform = output_transform
        self.cases: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self.cases = []

    def _collect(self, engine: Engine) -> None:
        preds, labels = self.output_transform(engine.state.output)
        for pred, label in zip(preds, labels):
            mask = binarise(torch.as_tensor(pred).float(), self.threshold, self.threshold_on)
            self.cases.append(lesion_detection(convert_to_numpy(mask)[0], convert_to_numpy(label)[0]))

    def _complete(self, engine: Engine) -> None:
        cases = self.cases
        if idist.get_world_size() > 1:
            cases = [c for part in idist.all_gather(json.dumps(cases)) for c in json.loads(part)]
        summary = summarise_lesions(cases)
        engine.state.metrics.update(
            lesion_detection_rate=summary["detection_rate"],
            false_lesions_per_case=summary["false_lesions_per_case"],
            mean_lesion_dice=summary["mean_lesion_dice"],
        )
        if self.output_dir is not None and idist.get_rank() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(summary, indent=4) + "\n"
            atomic_write(self.output_dir / LESION_METRICS_NAME, lambda f: f.write(text))
