"""The interaction-metrics handler of an interactive evaluation: collects per-click metrics and saves the reports.

The evaluator's iteration function (the click simulator) returns, per batch, ``click_dice`` and ``click_iou``
tensors of shape ``[B, K]``: the Dice / IoU of the binarised prediction after each of the ``K`` clicks, NaN where the
case's label has no lesion voxel; optionally ``click_compliance`` ``[B, K]`` (1 when the clicked voxel carries the
clicked label after the click, 0 when not, NaN for padding clicks) with ``click_labels`` (1/0/-1).
``ClickMetricsHandler`` collects them over an epoch, gathers them across ranks and writes the results. What it
computes lives in ``click_summary.py`` (per-click Dice/IoU, NoC, compliance), what it writes in ``click_report.py``
(CSV, JSON, plot) and how cases are named in ``case_ids.py``; their public names are importable from here too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import numpy as np
from monai.handlers import from_engine

from ..io import atomic_write
from .case_ids import case_id_from_path, case_ids_from_data
from .click_report import CSV_NAME, METRICS_NAME, PLOT_NAME, SUMMARY_NAME, dump_json, plot_png, write_csv
from .click_summary import (
    BEST_OVER_CLICKS_PROTOCOL,
    COMPLIANCE_POLICY,
    DEFAULT_NOC_THRESHOLDS,
    NO_LESION_POLICY,
    NOC_POLICY,
    as_rows,
    check_noc_thresholds,
    clicks_to_reach,
    json_number,
    noc_key,
    summarise_click_metrics,
)
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
        dice, iou = as_rows(dice_values), as_rows(iou_values)
        if dice.shape != iou.shape:
            raise ValueError(f"click_dice {dice.shape} and click_iou {iou.shape} differ in shape")
        given = self.compliance_transform(engine.state.output)
        if given is None:
            compliance: list[np.ndarray | None] = [None] * dice.shape[0]
            labels: list[np.ndarray | None] = [None] * dice.shape[0]
        else:
            compliance_rows, label_rows = as_rows(given[0]), as_rows(given[1])
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
                out / f"{self.prefix}{CSV_NAME}", lambda f: write_csv(f, cases, dice, iou, noc, compliance, labels)
            )
        atomic_write(out / f"{self.prefix}{SUMMARY_NAME}", lambda f: dump_json(summary, f))
        if self.summary_only:
            return
        gain = dice[:, -1] - dice[:, 0] if dice.shape[1] else np.zeros(len(cases))

        def per_case(values: np.ndarray) -> dict[str, float | None]:
            return {c: json_number(v) for c, v in zip(cases, values)}

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
        atomic_write(out / f"{self.prefix}{METRICS_NAME}", lambda f: dump_json(metrics, f))
        if self.save_plot:
            png = plot_png(summary)
            atomic_write(out / f"{self.prefix}{PLOT_NAME}", lambda f: f.write(png), binary=True)
