"""Interaction metrics of an interactive evaluation: an ignite handler that saves CSV, JSON summaries and a plot.

The evaluator's iteration function (the click simulator) returns, per batch, ``click_dice`` and ``click_iou``
tensors of shape ``[B, K]``: the Dice / IoU of the binarised prediction after each of the ``K`` clicks, NaN where the
case's label has no lesion voxel; optionally ``click_compliance`` ``[B, K]`` (1 when the clicked voxel carries the
clicked label after the click, 0 when not, NaN for padding clicks) with ``click_labels`` (1/0/-1).
``ClickMetricsHandler`` collects them over an epoch, gathers them across ranks and writes the results;
``summarise_click_metrics`` is the pure computation behind the summary: Dice/IoU per click, the Dice gain over click
1, NoC@80/85/90 (the clicks needed to reach a Dice, as in RITM and SimpleClick) and click compliance.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import numpy as np
import torch
from monai.data import MetaTensor
from monai.handlers import from_engine
from monai.utils import convert_to_numpy

from ..io import atomic_write
from .interaction import CLICK_COMPLIANCE, CLICK_DICE, CLICK_IOU, CLICK_LABELS

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "BEST_OVER_CLICKS_PROTOCOL",
    "COMPLIANCE_POLICY",
    "CSV_NAME",
    "ClickMetricsHandler",
    "DEFAULT_NOC_THRESHOLDS",
    "METRICS_NAME",
    "NOC_POLICY",
    "NO_LESION_POLICY",
    "PLOT_NAME",
    "SUMMARY_NAME",
    "case_id_from_path",
    "case_ids_from_data",
    "check_noc_thresholds",
    "clicks_to_reach",
    "compliance_from_output",
    "noc_key",
    "summarise_click_metrics",
]

CSV_NAME = "click_metrics.csv"
SUMMARY_NAME = "click_metrics_summary.json"
METRICS_NAME = "metrics.json"
PLOT_NAME = "click_metrics.png"

NO_LESION_POLICY = (
    "cases whose label has no lesion voxel have NaN Dice/IoU at every click; they are excluded from all means "
    "and counted in num_cases_without_lesion (their rows stay in the CSV with 'nan')"
)
BEST_OVER_CLICKS_PROTOCOL = (
    "mean over cases of the per-case maximum across clicks: the optimistic protocol used by SAM-Med3D's "
    "validation.py; the honest number is the *_last_click metric"
)

DEFAULT_NOC_THRESHOLDS = (0.80, 0.85, 0.90)
NOC_TOLERANCE = 1e-6
NOC_POLICY = (
    "noc_at_XX: per case, the number of clicks after which Dice >= 0.XX for the first time, counted as num_clicks "
    "when never reached (those cases are counted in noc_at_XX_num_never_reached); mean over the cases with a lesion"
)
COMPLIANCE_POLICY = (
    "share of clicks after which the binarised prediction at the clicked voxel equals the click's label (1 positive, "
    "0 negative), over the clicks of all cases; padding clicks (label -1, nothing left to correct) are excluded and "
    "counted in num_padding_clicks; None when the engine output has no click_compliance"
)

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".npy", ".npz", ".dcm", ".png", ".tif", ".tiff")


def case_id_from_path(path: str | os.PathLike) -> str:
    """Return the file name of ``path`` without its image extension, so CSV rows read ``case_00001``, not a path."""
    name = Path(str(path)).name
    lower = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _ids_from_sample(sample: Any, case_key: str, image_key: str) -> str | None:
    """Read the case id of one decollated sample dict (explicit key first, then the image file name)."""
    if not isinstance(sample, dict):
        return None
    if case_key in sample and sample[case_key] is not None:
        value = sample[case_key]
        return str(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
    image = sample.get(image_key)
    filename = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    if filename is None and isinstance(sample.get(f"{image_key}_meta_dict"), dict):
        filename = sample[f"{image_key}_meta_dict"].get("filename_or_obj")
    if isinstance(filename, (list, tuple)):
        filename = filename[0] if len(filename) == 1 else None
    return case_id_from_path(filename) if filename else None


def case_ids_from_data(data: Any, case_key: str = "case", image_key: str = "image") -> list[str | None] | None:
    """Return the case ids of a batched dict or a decollated list of dicts (None where unknown), for the CSV rows.

    An explicit ``case_key`` entry wins; otherwise the id is the file name (without extension) found in
    ``data[image_key].meta["filename_or_obj"]`` (or the legacy ``{image_key}_meta_dict``).
    """
    if isinstance(data, (list, tuple)):
        return [_ids_from_sample(sample, case_key, image_key) for sample in data]
    if not isinstance(data, dict):
        return None
    values: Any = None
    if case_key in data and data[case_key] is not None:
        values = data[case_key]
        if isinstance(values, torch.Tensor):
            values = values.reshape(-1).tolist()
        values = [values] if isinstance(values, (str, int)) else list(values)
        return [None if v is None else str(v) for v in values]
    image = data.get(image_key)
    if isinstance(image, MetaTensor):
        values = image.meta.get("filename_or_obj")
    if values is None and isinstance(data.get(f"{image_key}_meta_dict"), dict):
        values = data[f"{image_key}_meta_dict"].get("filename_or_obj")
    if values is None:
        return None
    values = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    return [case_id_from_path(v) if v else None for v in values]


def _as_rows(values: Any) -> np.ndarray:
    """Turn a ``[B, K]`` tensor/array or a list of B ``[K]`` tensors into a float64 ``[B, K]`` array."""
    if isinstance(values, (list, tuple)):
        rows = [np.asarray(convert_to_numpy(v, dtype=np.float64)).reshape(-1) for v in values]
        if not rows:
            return np.zeros((0, 0), dtype=np.float64)
        if len({row.shape[0] for row in rows}) != 1:
            raise ValueError(f"per-sample click metrics have different numbers of clicks: {[r.shape[0] for r in rows]}")
        return np.stack(rows)
    array = np.asarray(convert_to_numpy(values, dtype=np.float64))
    if array.ndim == 1:
        return array[None]
    if array.ndim != 2:
        raise ValueError(f"click metrics must be [B, K] (or a list of [K]); got shape {tuple(array.shape)}")
    return array


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of a 1-D array as a JSON-ready float, None when empty."""
    return float(values.mean()) if values.size else None


def _list_or_nones(values: np.ndarray | None, k: int) -> list[float | None]:
    """A per-click array as a JSON-ready list (NaN -> None), or K Nones when there is nothing to report."""
    if values is None:
        return [None] * k
    return [None if math.isnan(v) else float(v) for v in values]


def noc_key(threshold: float) -> str:
    """Name of the NoC metric at a Dice threshold (0.85 -> ``noc_at_85``, 0.875 -> ``noc_at_87_5``), JSON/CSV-safe."""
    percent = round(float(threshold) * 100.0, 6)
    text = f"{percent:g}" if percent != int(percent) else str(int(percent))
    return f"noc_at_{text.replace('.', '_')}"


def check_noc_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Validate NoC Dice thresholds (numbers in (0, 1], distinct names) so a config typo fails before evaluation."""
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise TypeError(f"noc_thresholds must be a list of numbers in (0, 1], got {thresholds!r}")
    out = []
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0:
            raise ValueError(f"noc_thresholds must be numbers in (0, 1] (Dice, not percent), got {t!r}")
        out.append(float(t))
    keys = [noc_key(t) for t in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"noc_thresholds repeat a threshold: {list(thresholds)}")
    return tuple(out)


def clicks_to_reach(dice: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per case, the clicks needed to reach ``Dice >= threshold`` (K when never) and whether it was never reached.

    Rows with NaN (cases without lesion) get NaN and are not counted as never reached. Dice arrives as float32, so
    a value within ``NOC_TOLERANCE`` below the threshold counts as reached (float32(0.9) is 0.89999998).
    """
    dice = np.asarray(dice, dtype=np.float64)
    num_clicks = dice.shape[1]
    no_lesion = np.isnan(dice).any(axis=1)
    reached = np.nan_to_num(dice, nan=-1.0) >= threshold - NOC_TOLERANCE
    never = ~reached.any(axis=1) & ~no_lesion
    noc = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, num_clicks).astype(np.float64)
    noc[no_lesion] = np.nan
    return noc, never


def _compliance_summary(compliance: np.ndarray | None, labels: np.ndarray | None, k: int) -> dict[str, Any]:
    """Share of positive / negative clicks whose voxel carries the clicked label afterwards (padding excluded)."""
    keys = ("compliance", "compliance_positive", "compliance_negative")
    if compliance is None or labels is None:
        out: dict[str, Any] = {"compliance_available": False}
        out.update({key: None for key in keys})
        out.update({f"num_{w}_clicks": None for w in ("compliance", "positive", "negative", "padding")})
        out.update({f"{key}_per_click": [None] * k for key in keys})
        return out
    defined = np.isfinite(compliance)
    masks = {
        "compliance": defined & ((labels == 0) | (labels == 1)),
        "compliance_positive": defined & (labels == 1),
        "compliance_negative": defined & (labels == 0),
    }
    out = {"compliance_available": True}
    for key, mask in masks.items():
        out[key] = _mean_or_none(compliance[mask])
    out["num_compliance_clicks"] = int(masks["compliance"].sum())
    out["num_positive_clicks"] = int(masks["compliance_positive"].sum())
    out["num_negative_clicks"] = int(masks["compliance_negative"].sum())
    out["num_padding_clicks"] = int((labels < 0).sum())
    for key, mask in masks.items():
        counts = mask.sum(axis=0)
        sums = np.where(mask, compliance, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"{key}_per_click"] = _list_or_nones(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), k)
    return out


def summarise_click_metrics(
    case_ids: Sequence[str],
    dice: np.ndarray | Sequence[Sequence[float]],
    iou: np.ndarray | Sequence[Sequence[float]],
    compliance: np.ndarray | Sequence[Sequence[float]] | None = None,
    click_labels: np.ndarray | Sequence[Sequence[int]] | None = None,
    noc_thresholds: Sequence[float] = DEFAULT_NOC_THRESHOLDS,
) -> dict[str, Any]:
    """Summarise ``[N, K]`` per-case per-click Dice/IoU (and click compliance) into the reported, JSON-ready numbers.

    Besides Dice/IoU per click: NoC at each threshold (mean over lesion cases, never-reached counted as K and counted
    separately), the Dice gain over click 1, the per-click spread across cases (for the plot) and, when
    ``compliance`` and ``click_labels`` are given, click compliance for positive and negative clicks.
    """
    dice = np.asarray(dice, dtype=np.float64)
    iou = np.asarray(iou, dtype=np.float64)
    if dice.size == 0 and dice.ndim < 2:
        dice = dice.reshape(0, 0)
        iou = iou.reshape(0, 0)
    if dice.ndim != 2 or dice.shape != iou.shape:
        raise ValueError(f"dice and iou must both be [N, K]; got {dice.shape} and {iou.shape}")
    if len(case_ids) != dice.shape[0]:
        raise ValueError(f"{len(case_ids)} case ids for {dice.shape[0]} rows of click metrics")
    if (compliance is None) != (click_labels is None):
        raise ValueError("compliance and click_labels go together: give both or neither")
    if compliance is not None:
        compliance = np.asarray(compliance, dtype=np.float64).reshape(dice.shape[0], -1)
        click_labels = np.asarray(click_labels, dtype=np.float64).reshape(dice.shape[0], -1)
        if compliance.shape != dice.shape or click_labels.shape != dice.shape:
            raise ValueError(
                f"compliance {compliance.shape} and click_labels {click_labels.shape} must match dice {dice.shape}"
            )
    thresholds = check_noc_thresholds(noc_thresholds)
    num_clicks = int(dice.shape[1])
    no_lesion = np.isnan(dice).any(axis=1) | np.isnan(iou).any(axis=1)
    valid_dice, valid_iou = dice[~no_lesion], iou[~no_lesion]
    have_cases = valid_dice.shape[0] > 0 and num_clicks > 0

    def per_click(values: np.ndarray | None) -> list[float | None]:
        return _list_or_nones(values if have_cases else None, num_clicks)

    gain = valid_dice - valid_dice[:, :1] if have_cases else None
    summary: dict[str, Any] = {
        "num_cases": int(dice.shape[0]),
        "num_clicks": num_clicks,
        "num_cases_in_means": int(valid_dice.shape[0]),
        "dice_last_click": _mean_or_none(valid_dice[:, -1]) if have_cases else None,
        "iou_last_click": _mean_or_none(valid_iou[:, -1]) if have_cases else None,
        "dice_first_click": _mean_or_none(valid_dice[:, 0]) if have_cases else None,
        "dice_gain_last_click": _mean_or_none(gain[:, -1]) if gain is not None else None,
        "noc_thresholds": list(thresholds),
    }
    for threshold in thresholds:
        noc, never = clicks_to_reach(dice, threshold)
        key = noc_key(threshold)
        summary[key] = _mean_or_none(noc[~no_lesion]) if have_cases else None
        summary[f"{key}_num_never_reached"] = int(never.sum())
    summary["noc_policy"] = NOC_POLICY
    summary.update(_compliance_summary(compliance, click_labels, num_clicks))
    summary["compliance_policy"] = COMPLIANCE_POLICY
    summary.update(
        {
            "dice_best_over_clicks": _mean_or_none(valid_dice.max(axis=1)) if have_cases else None,
            "iou_best_over_clicks": _mean_or_none(valid_iou.max(axis=1)) if have_cases else None,
            "best_over_clicks_protocol": BEST_OVER_CLICKS_PROTOCOL,
            "mean_dice_per_click": per_click(valid_dice.mean(axis=0) if have_cases else None),
            "mean_iou_per_click": per_click(valid_iou.mean(axis=0) if have_cases else None),
            "dice_gain_per_click": per_click(gain.mean(axis=0) if gain is not None else None),
        }
    )
    for name, q in (("min", 0), ("q25", 25), ("median", 50), ("q75", 75), ("max", 100)):
        summary[f"{name}_dice_per_click"] = per_click(np.percentile(valid_dice, q, axis=0) if have_cases else None)
    summary.update(
        {
            "num_cases_without_lesion": int(no_lesion.sum()),
            "cases_without_lesion": [str(c) for c, flag in zip(case_ids, no_lesion) if flag],
            "no_lesion_policy": NO_LESION_POLICY,
        }
    )
    return summary


def _json_number(value: float) -> float | None:
    """Map NaN to None so the JSON files stay standard (no bare NaN tokens)."""
    return None if math.isnan(value) else float(value)


def compliance_from_output(output: Any) -> tuple[Any, Any] | None:
    """Read ``(click_compliance, click_labels)`` from an engine output (dict or decollated list), None when absent."""
    keys = (CLICK_COMPLIANCE, CLICK_LABELS)
    if isinstance(output, dict):
        return (output[keys[0]], output[keys[1]]) if all(output.get(k) is not None for k in keys) else None
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, dict) for o in output):
        if all(o.get(k) is not None for o in output for k in keys):
            return [o[keys[0]] for o in output], [o[keys[1]] for o in output]
    return None


class ClickMetricsHandler:
    """Collect per-case per-click interaction metrics over an evaluation epoch and save CSV, JSON summaries and a plot.

    Attach it to a ``monai.engines.SupervisedEvaluator`` whose iteration function returns ``click_dice`` and
    ``click_iou`` (``[B, K]``; ``[K]`` per sample once decollated) and, optionally, ``click_compliance`` (1/0, NaN for
    padding clicks) with ``click_labels`` (1/0/-1). At ``EPOCH_COMPLETED`` the values of all ranks are gathered,
    ``dice_last_click``, ``dice_best_over_clicks``, ``iou_last_click``, ``dice_gain_last_click``, the NoC means and the
    compliance shares go into ``engine.state.metrics`` (every rank; NaN where undefined), and rank 0 writes into
    ``output_dir`` (each name prefixed by ``prefix``):

    - ``click_metrics.csv``: one row per case (sorted by id), ``case, dice_click_1..K, iou_click_1..K``, the per-case
      NoC (``noc_at_80, ...``; NaN without lesion) and, with compliance, ``label_click_1..K, compliance_click_1..K``;
    - ``click_metrics_summary.json``: the output of :func:`summarise_click_metrics`;
    - ``metrics.json``: Dice/IoU at the last click, Dice gain and NoC (``mean`` and ``per_case``), compliance shares;
    - ``click_metrics.png``: Dice per click with its spread across cases, compliance per click, NoC per threshold.

    Args:
        output_dir: folder for the files (created when missing).
        prefix: prepended to every file name, e.g. ``"val_"`` for the validation run inside training.
        save_plot: whether to write the PNG plot.
        output_transform: maps ``engine.state.output`` to ``(click_dice, click_iou)``, each ``[B, K]`` or a list of
            ``[K]``; default ``from_engine(["click_dice", "click_iou"])``, which handles both layouts.
        batch_transform: maps ``engine.state.batch`` to the data the case ids are read from (default: unchanged).
        case_transform: maps that data (or, if it gives no ids, ``engine.state.output``) to a list of B case ids,
            None where unknown; default :func:`case_ids_from_data` (key ``"case"``, else the image file name).
            Unknown ids become ``case_<global index>``.
        summary_only: write only ``click_metrics_summary.json`` (e.g. for frequent validation during training).
        noc_thresholds: Dice thresholds of the NoC metrics (default 0.80, 0.85, 0.90: ``noc_at_80/85/90``).
        compliance_transform: maps ``engine.state.output`` to ``(click_compliance, click_labels)`` or None when the
            output has none (compliance is then reported as None); default :func:`compliance_from_output`.
        name: logger name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        prefix: str = "",
        save_plot: bool = True,
        output_transform: Callable[[Any], tuple[Any, Any]] | None = None,
        batch_transform: Callable[[Any], Any] = lambda x: x,
        case_transform: Callable[[Any], Sequence[str | None] | None] = case_ids_from_data,
        summary_only: bool = False,
        noc_thresholds: Sequence[float] = DEFAULT_NOC_THRESHOLDS,
        compliance_transform: Callable[[Any], tuple[Any, Any] | None] = compliance_from_output,
        name: str | None = None,
    ) -> None:
        """Store the options; nothing is collected until the handler is attached to an engine."""
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.save_plot = save_plot
        self.output_transform = output_transform or from_engine([CLICK_DICE, CLICK_IOU])
        self.batch_transform = batch_transform
        self.case_transform = case_transform
        self.summary_only = summary_only
        self.noc_thresholds = check_noc_thresholds(noc_thresholds)
        self.compliance_transform = compliance_transform
        self.logger = logging.getLogger(name or __name__)
        self._cases: list[str] = []
        self._dice: list[np.ndarray] = []
        self._iou: list[np.ndarray] = []
        self._compliance: list[np.ndarray | None] = []
        self._labels: list[np.ndarray | None] = []
        self._num_seen = 0

    def attach(self, engine: Engine) -> None:
        """Register the epoch/iteration callbacks on ``engine`` (idempotent)."""
        from ignite.engine import Events

        if not engine.has_event_handler(self.epoch_started, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        if not engine.has_event_handler(self.iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        """Forget the values of the previous epoch."""
        self._cases, self._dice, self._iou, self._num_seen = [], [], [], 0
        self._compliance, self._labels = [], []

    def iteration_completed(self, engine: Engine) -> None:
        """Append this batch's per-case click Dice/IoU, compliance (when given) and case ids."""
        if engine.state.output is None:
            return
        dice_values, iou_values = self.output_transform(engine.state.output)
        dice, iou = _as_rows(dice_values), _as_rows(iou_values)
        if dice.shape != iou.shape:
            raise ValueError(f"click_dice {dice.shape} and click_iou {iou.shape} differ in shape")
        given = self.compliance_transform(engine.state.output)
        if given is None:
            compliance: list[np.ndarray | None] = [None] * dice.shape[0]
            labels: list[np.ndarray | None] = [None] * dice.shape[0]
        else:
            compliance_rows, label_rows = _as_rows(given[0]), _as_rows(given[1])
            if compliance_rows.shape != dice.shape or label_rows.shape != dice.shape:
                raise ValueError(
                    f"click_compliance {compliance_rows.shape} and click_labels {label_rows.shape} must match "
                    f"click_dice {dice.shape}"
                )
            compliance, labels = list(compliance_rows), list(label_rows)
        ids = self._case_ids(engine, dice.shape[0])
        self._cases.extend(ids)
        self._dice.extend(dice)
        self._iou.extend(iou)
        self._compliance.extend(compliance)
        self._labels.extend(labels)

    def _case_ids(self, engine: Engine, batch_size: int) -> list[str]:
        """Read the batch's case ids, falling back to ``case_<global index>`` where none is found."""
        ids: Sequence[str | None] | None = None
        if engine.state.batch is not None:
            ids = self.case_transform(self.batch_transform(engine.state.batch))
        if not ids or all(i is None for i in ids):
            ids = self.case_transform(engine.state.output)
        if ids is not None and len(ids) != batch_size:
            self.logger.warning(f"got {len(ids)} case ids for a batch of {batch_size}; using case_<index> instead")
            ids = None
        rank, world_size = idist.get_rank(), idist.get_world_size()
        out = []
        for i in range(batch_size):
            case = ids[i] if ids is not None else None
            # DistributedSampler (no shuffle) hands rank r the dataset items r, r + world_size, ...
            out.append(case if case is not None else f"case_{(self._num_seen + i) * world_size + rank:05d}")
        self._num_seen += batch_size
        return out

    def _gather(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Gather all ranks' cases, drop repeats (DistributedSampler padding) and sort by case id.

        Returns the case ids, Dice, IoU and, when every case came with them, compliance and click labels (else None).
        """

        def as_lists(rows: list[np.ndarray | None]) -> list[list[float] | None]:
            return [None if row is None else row.tolist() for row in rows]

        local = {
            "cases": list(self._cases),
            "dice": as_lists(self._dice),
            "iou": as_lists(self._iou),
            "compliance": as_lists(self._compliance),
            "labels": as_lists(self._labels),
        }
        gathered = idist.all_gather(local)
        rows: dict[str, tuple[Any, Any, Any, Any]] = {}
        repeats = 0
        num_clicks = {len(d) for part in gathered for d in part["dice"]}
        if len(num_clicks) > 1:
            raise ValueError(f"cases were evaluated with different numbers of clicks: {sorted(num_clicks)}")
        for part in gathered:
            for row in zip(part["cases"], part["dice"], part["iou"], part["compliance"], part["labels"]):
                if row[0] in rows:
                    repeats += 1
                    continue
                rows[row[0]] = row[1:]
        if repeats and idist.get_rank() == 0:
            self.logger.warning(f"{repeats} repeated case id(s) dropped (kept the first; e.g. distributed padding)")
        cases = sorted(rows)
        k = num_clicks.pop() if num_clicks else 0

        def table(column: int) -> np.ndarray:
            return np.array([rows[c][column] for c in cases], dtype=np.float64).reshape(len(cases), k)

        with_compliance = [rows[c][2] is not None and rows[c][3] is not None for c in cases]
        compliance = labels = None
        if cases and all(with_compliance):
            compliance, labels = table(2), table(3)
        elif any(with_compliance) and idist.get_rank() == 0:
            self.logger.warning(
                f"click_compliance came with {sum(with_compliance)} of {len(cases)} cases; compliance not reported"
            )
        return cases, table(0), table(1), compliance, labels

    def epoch_completed(self, engine: Engine) -> None:
        """Gather, publish the key metrics in ``engine.state.metrics`` and (rank 0) write the files."""
        cases, dice, iou, compliance, labels = self._gather()
        summary = summarise_click_metrics(cases, dice, iou, compliance, labels, self.noc_thresholds)
        keys = ["dice_last_click", "dice_best_over_clicks", "iou_last_click", "dice_gain_last_click"]
        keys += [noc_key(t) for t in self.noc_thresholds] + ["compliance_positive", "compliance_negative"]
        for key in keys:
            value = summary[key]
            engine.state.metrics[key] = float("nan") if value is None else value
        if idist.get_rank() != 0:
            return
        if not cases:
            self.logger.warning("no click metrics were collected this epoch; nothing written")
            return
        self.write(cases, dice, iou, summary, compliance, labels)
        noc = ", ".join(f"{noc_key(t)}={summary[noc_key(t)]}" for t in self.noc_thresholds)
        self.logger.info(
            f"click metrics of {len(cases)} cases saved to {self.output_dir}: dice_last_click="
            f"{summary['dice_last_click']}, dice_best_over_clicks={summary['dice_best_over_clicks']}, "
            f"dice_gain_last_click={summary['dice_gain_last_click']}, {noc}, compliance_positive="
            f"{summary['compliance_positive']}, compliance_negative={summary['compliance_negative']}"
        )

    def write(
        self,
        cases: Sequence[str],
        dice: np.ndarray,
        iou: np.ndarray,
        summary: dict[str, Any],
        compliance: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        """Write the CSV, the two JSON files and the plot (each atomically) into ``output_dir``."""
        out = self.output_dir
        thresholds = summary.get("noc_thresholds", self.noc_thresholds)
        noc = {noc_key(t): clicks_to_reach(dice, t)[0] for t in thresholds}
        if not self.summary_only:
            atomic_write(
                out / f"{self.prefix}{CSV_NAME}", lambda f: _write_csv(f, cases, dice, iou, noc, compliance, labels)
            )
        atomic_write(out / f"{self.prefix}{SUMMARY_NAME}", lambda f: _dump_json(summary, f))
        if self.summary_only:
            return
        gain = dice[:, -1] - dice[:, 0] if dice.shape[1] else np.zeros(len(cases))

        def per_case(values: np.ndarray) -> dict[str, float | None]:
            return {c: _json_number(v) for c, v in zip(cases, values)}

        metrics: dict[str, Any] = {
            "num_clicks": summary["num_clicks"],
            "dice_last_click": {"mean": summary["dice_last_click"], "per_case": per_case(dice[:, -1])},
            "iou_last_click": {"mean": summary["iou_last_click"], "per_case": per_case(iou[:, -1])},
            "dice_gain_last_click": {"mean": summary["dice_gain_last_click"], "per_case": per_case(gain)},
        }
        for key, values in noc.items():
            metrics[key] = {
                "mean": summary[key],
                "num_never_reached": summary[f"{key}_num_never_reached"],
                "per_case": per_case(values),
            }
        for kind in ("positive", "negative"):
            metrics[f"compliance_{kind}"] = {
                "mean": summary[f"compliance_{kind}"],
                "num_clicks": summary[f"num_{kind}_clicks"],
            }
        atomic_write(out / f"{self.prefix}{METRICS_NAME}", lambda f: _dump_json(metrics, f))
        if self.save_plot:
            png = _plot_png(summary)
            atomic_write(out / f"{self.prefix}{PLOT_NAME}", lambda f: f.write(png), binary=True)


def _dump_json(obj: Any, f: Any) -> None:
    """Dump strict JSON with indent 4 (the project's convention)."""
    json.dump(obj, f, indent=4, allow_nan=False)
    f.write("\n")


def _write_csv(
    f: Any,
    cases: Sequence[str],
    dice: np.ndarray,
    iou: np.ndarray,
    noc: dict[str, np.ndarray] | None = None,
    compliance: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> None:
    """Write one row per case: per-click Dice then IoU (6 decimals), NoC per threshold, then click labels/compliance."""
    k = dice.shape[1]
    noc = noc or {}
    clicks = range(1, k + 1)
    header = ["case"] + [f"dice_click_{i}" for i in clicks] + [f"iou_click_{i}" for i in clicks] + list(noc)
    with_compliance = compliance is not None and labels is not None
    if with_compliance:
        header += [f"label_click_{i}" for i in clicks] + [f"compliance_click_{i}" for i in clicks]
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    for n, (case, d, u) in enumerate(zip(cases, dice, iou)):
        row = [case] + [f"{v:.6f}" for v in d] + [f"{v:.6f}" for v in u]
        row += ["nan" if math.isnan(values[n]) else str(int(values[n])) for values in noc.values()]
        if with_compliance:
            row += [str(int(v)) for v in labels[n]] + ["nan" if math.isnan(v) else f"{v:g}" for v in compliance[n]]
        writer.writerow(row)


def _curve(values: list[float | None]) -> np.ndarray:
    """A JSON per-click list (None for undefined) as a float array with NaN, for plotting."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _plot_png(summary: dict[str, Any]) -> bytes:
    """Render Dice per click with its spread, compliance per click and NoC per threshold (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    k = summary["num_clicks"]
    clicks = np.arange(1, k + 1)
    fig = Figure(figsize=(15, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_dice, ax_comp, ax_noc = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1.0, 0.8]})

    for low, high, alpha, label in (("min", "max", 0.12, "Dice min-max"), ("q25", "q75", 0.3, "Dice interquartile")):
        ax_dice.fill_between(
            clicks,
            _curve(summary[f"{low}_dice_per_click"]),
            _curve(summary[f"{high}_dice_per_click"]),
            color="tab:blue",
            alpha=alpha,
            linewidth=0,
            label=label,
        )
    ax_dice.plot(clicks, _curve(summary["median_dice_per_click"]), color="tab:blue", linestyle=":", label="median Dice")
    ax_dice.plot(clicks, _curve(summary["mean_dice_per_click"]), color="tab:blue", marker="o", label="mean Dice")
    ax_dice.plot(clicks, _curve(summary["mean_iou_per_click"]), color="tab:orange", marker="s", label="mean IoU")
    ax_dice.set_ylim(0.0, 1.0)
    ax_dice.set_ylabel("over cases")
    title = f"Dice per click ({summary['num_cases_in_means']} cases"
    if summary["num_cases_without_lesion"]:
        title += f", {summary['num_cases_without_lesion']} without lesion excluded"
    ax_dice.set_title(title + ")")
    ax_dice.legend(loc="lower right", fontsize="small")

    if summary.get("compliance_available"):
        for kind, marker in (("positive", "^"), ("negative", "v")):
            share, num = summary[f"compliance_{kind}"], summary[f"num_{kind}_clicks"]
            text = "n/a" if share is None else f"{share:.2f}"
            label = f"{kind} clicks: {text} of {num}"
            ax_comp.plot(clicks, _curve(summary[f"compliance_{kind}_per_click"]), marker=marker, label=label)
        ax_comp.legend(loc="lower right", fontsize="small")
    else:
        ax_comp.text(
            0.5, 0.5, "no click_compliance\nin the engine output", ha="center", va="center", transform=ax_comp.transAxes
        )
    ax_comp.set_ylim(-0.02, 1.02)
    ax_comp.set_ylabel("share of clicks whose voxel gets the clicked label")
    ax_comp.set_title("click compliance")
    for ax in (ax_dice, ax_comp):
        ax.set_xlabel("click number")
        ax.set_xlim(0.5, max(k, 1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)

    thresholds = summary.get("noc_thresholds", [])
    means = [summary[noc_key(t)] for t in thresholds]
    positions = np.arange(len(thresholds))
    ax_noc.bar(positions, [np.nan if m is None else m for m in means], color="tab:green", alpha=0.7)
    for x, t, m in zip(positions, thresholds, means):
        never = summary[f"{noc_key(t)}_num_never_reached"]
        label = "n/a" if m is None else f"{m:.2f}"
        text = f"{label}\n{never} of {summary['num_cases_in_means']} never"
        ax_noc.text(x, (m or 0) + 0.05 * max(k, 1), text, ha="center", va="bottom", fontsize="small")
    ax_noc.set_xticks(positions, [f"NoC@{t * 100:g}" for t in thresholds])
    ax_noc.set_ylim(0, max(k, 1) * 1.25)
    ax_noc.set_ylabel(f"mean clicks (max {k})")
    ax_noc.set_title("clicks to reach Dice")
    ax_noc.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
