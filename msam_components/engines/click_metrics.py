"""Per-case, per-click Dice and IoU of an interactive evaluation: an ignite handler that saves CSV, JSON and a plot.

The evaluator's iteration function (the click simulator) returns, per batch, ``click_dice`` and ``click_iou``
tensors of shape ``[B, K]``: the Dice / IoU of the binarised prediction after each of the ``K`` clicks, NaN where the
case's label has no lesion voxel. ``ClickMetricsHandler`` collects them over an epoch, gathers them across ranks and
writes the results; ``summarise_click_metrics`` is the pure computation behind the summary.
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

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "BEST_OVER_CLICKS_PROTOCOL",
    "CSV_NAME",
    "ClickMetricsHandler",
    "METRICS_NAME",
    "NO_LESION_POLICY",
    "PLOT_NAME",
    "SUMMARY_NAME",
    "case_id_from_path",
    "case_ids_from_data",
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


def summarise_click_metrics(
    case_ids: Sequence[str], dice: np.ndarray | Sequence[Sequence[float]], iou: np.ndarray | Sequence[Sequence[float]]
) -> dict[str, Any]:
    """Summarise ``[N, K]`` per-case per-click Dice/IoU into the JSON-ready numbers reported for an evaluation."""
    dice = np.asarray(dice, dtype=np.float64)
    iou = np.asarray(iou, dtype=np.float64)
    if dice.size == 0 and dice.ndim < 2:
        dice = dice.reshape(0, 0)
        iou = iou.reshape(0, 0)
    if dice.ndim != 2 or dice.shape != iou.shape:
        raise ValueError(f"dice and iou must both be [N, K]; got {dice.shape} and {iou.shape}")
    if len(case_ids) != dice.shape[0]:
        raise ValueError(f"{len(case_ids)} case ids for {dice.shape[0]} rows of click metrics")
    num_clicks = int(dice.shape[1])
    no_lesion = np.isnan(dice).any(axis=1) | np.isnan(iou).any(axis=1)
    valid_dice, valid_iou = dice[~no_lesion], iou[~no_lesion]
    have_cases = valid_dice.shape[0] > 0 and num_clicks > 0
    return {
        "num_cases": int(dice.shape[0]),
        "num_clicks": num_clicks,
        "num_cases_in_means": int(valid_dice.shape[0]),
        "dice_last_click": _mean_or_none(valid_dice[:, -1]) if have_cases else None,
        "iou_last_click": _mean_or_none(valid_iou[:, -1]) if have_cases else None,
        "dice_best_over_clicks": _mean_or_none(valid_dice.max(axis=1)) if have_cases else None,
        "iou_best_over_clicks": _mean_or_none(valid_iou.max(axis=1)) if have_cases else None,
        "best_over_clicks_protocol": BEST_OVER_CLICKS_PROTOCOL,
        "mean_dice_per_click": [float(v) for v in valid_dice.mean(axis=0)] if have_cases else [None] * num_clicks,
        "mean_iou_per_click": [float(v) for v in valid_iou.mean(axis=0)] if have_cases else [None] * num_clicks,
        "num_cases_without_lesion": int(no_lesion.sum()),
        "cases_without_lesion": [str(c) for c, flag in zip(case_ids, no_lesion) if flag],
        "no_lesion_policy": NO_LESION_POLICY,
    }


def _json_number(value: float) -> float | None:
    """Map NaN to None so the JSON files stay standard (no bare NaN tokens)."""
    return None if math.isnan(value) else float(value)


class ClickMetricsHandler:
    """Collect per-case per-click Dice/IoU over an evaluation epoch and save CSV, JSON summaries and a plot.

    Attach it to a ``monai.engines.SupervisedEvaluator`` whose iteration function returns ``click_dice`` and
    ``click_iou`` (``[B, K]``; ``[K]`` per sample once decollated). At ``EPOCH_COMPLETED`` the values of all ranks
    are gathered, ``dice_last_click``, ``dice_best_over_clicks`` and ``iou_last_click`` go into
    ``engine.state.metrics`` (every rank), and rank 0 writes into ``output_dir`` (each name prefixed by ``prefix``):

    - ``click_metrics.csv``: one row per case (sorted by id), ``case, dice_click_1..K, iou_click_1..K``;
    - ``click_metrics_summary.json``: the output of :func:`summarise_click_metrics`;
    - ``metrics.json``: Dice and IoU at the last click, ``mean`` and ``per_case``;
    - ``click_metrics.png``: mean Dice and IoU against the click number.

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
        name: str | None = None,
    ) -> None:
        """Store the options; nothing is collected until the handler is attached to an engine."""
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.save_plot = save_plot
        self.output_transform = output_transform or from_engine(["click_dice", "click_iou"])
        self.batch_transform = batch_transform
        self.case_transform = case_transform
        self.summary_only = summary_only
        self.logger = logging.getLogger(name or __name__)
        self._cases: list[str] = []
        self._dice: list[np.ndarray] = []
        self._iou: list[np.ndarray] = []
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

    def iteration_completed(self, engine: Engine) -> None:
        """Append this batch's per-case click Dice/IoU and case ids."""
        if engine.state.output is None:
            return
        dice_values, iou_values = self.output_transform(engine.state.output)
        dice, iou = _as_rows(dice_values), _as_rows(iou_values)
        if dice.shape != iou.shape:
            raise ValueError(f"click_dice {dice.shape} and click_iou {iou.shape} differ in shape")
        ids = self._case_ids(engine, dice.shape[0])
        self._cases.extend(ids)
        self._dice.extend(dice)
        self._iou.extend(iou)

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

    def _gather(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Gather all ranks' cases, drop repeats (DistributedSampler padding) and sort by case id."""
        local = {
            "cases": list(self._cases),
            "dice": [row.tolist() for row in self._dice],
            "iou": [row.tolist() for row in self._iou],
        }
        gathered = idist.all_gather(local)
        rows: dict[str, tuple[list[float], list[float]]] = {}
        repeats = 0
        num_clicks = {len(d) for part in gathered for d in part["dice"]}
        if len(num_clicks) > 1:
            raise ValueError(f"cases were evaluated with different numbers of clicks: {sorted(num_clicks)}")
        for part in gathered:
            for case, d, u in zip(part["cases"], part["dice"], part["iou"]):
                if case in rows:
                    repeats += 1
                    continue
                rows[case] = (d, u)
        if repeats and idist.get_rank() == 0:
            self.logger.warning(f"{repeats} repeated case id(s) dropped (kept the first; e.g. distributed padding)")
        cases = sorted(rows)
        k = num_clicks.pop() if num_clicks else 0
        dice = np.array([rows[c][0] for c in cases], dtype=np.float64).reshape(len(cases), k)
        iou = np.array([rows[c][1] for c in cases], dtype=np.float64).reshape(len(cases), k)
        return cases, dice, iou

    def epoch_completed(self, engine: Engine) -> None:
        """Gather, publish the key metrics in ``engine.state.metrics`` and (rank 0) write the files."""
        cases, dice, iou = self._gather()
        summary = summarise_click_metrics(cases, dice, iou)
        for key in ("dice_last_click", "dice_best_over_clicks", "iou_last_click"):
            value = summary[key]
            engine.state.metrics[key] = float("nan") if value is None else value
        if idist.get_rank() != 0:
            return
        if not cases:
            self.logger.warning("no click metrics were collected this epoch; nothing written")
            return
        self.write(cases, dice, iou, summary)
        self.logger.info(
            f"click metrics of {len(cases)} cases saved to {self.output_dir}: dice_last_click="
            f"{summary['dice_last_click']}, dice_best_over_clicks={summary['dice_best_over_clicks']}"
        )

    def write(self, cases: Sequence[str], dice: np.ndarray, iou: np.ndarray, summary: dict[str, Any]) -> None:
        """Write the CSV, the two JSON files and the plot (each atomically) into ``output_dir``."""
        out = self.output_dir
        if not self.summary_only:
            atomic_write(out / f"{self.prefix}{CSV_NAME}", lambda f: _write_csv(f, cases, dice, iou))
        atomic_write(out / f"{self.prefix}{SUMMARY_NAME}", lambda f: _dump_json(summary, f))
        if self.summary_only:
            return
        metrics = {
            "num_clicks": summary["num_clicks"],
            "dice_last_click": {
                "mean": summary["dice_last_click"],
                "per_case": {c: _json_number(v) for c, v in zip(cases, dice[:, -1])},
            },
            "iou_last_click": {
                "mean": summary["iou_last_click"],
                "per_case": {c: _json_number(v) for c, v in zip(cases, iou[:, -1])},
            },
        }
        atomic_write(out / f"{self.prefix}{METRICS_NAME}", lambda f: _dump_json(metrics, f))
        if self.save_plot:
            png = _plot_png(summary)
            atomic_write(out / f"{self.prefix}{PLOT_NAME}", lambda f: f.write(png), binary=True)


def _dump_json(obj: Any, f: Any) -> None:
    """Dump strict JSON with indent 4 (the project's convention)."""
    json.dump(obj, f, indent=4, allow_nan=False)
    f.write("\n")


def _write_csv(f: Any, cases: Sequence[str], dice: np.ndarray, iou: np.ndarray) -> None:
    """Write one row per case with the per-click Dice then IoU values, 6 decimals."""
    k = dice.shape[1]
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(
        ["case"] + [f"dice_click_{i}" for i in range(1, k + 1)] + [f"iou_click_{i}" for i in range(1, k + 1)]
    )
    for case, d, u in zip(cases, dice, iou):
        writer.writerow([case] + [f"{v:.6f}" for v in d] + [f"{v:.6f}" for v in u])


def _plot_png(summary: dict[str, Any]) -> bytes:
    """Render mean Dice and IoU against click number with the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    k = summary["num_clicks"]
    clicks = np.arange(1, k + 1)

    def curve(values: list[float | None]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(clicks, curve(summary["mean_dice_per_click"]), marker="o", label="mean Dice")
    ax.plot(clicks, curve(summary["mean_iou_per_click"]), marker="s", label="mean IoU")
    ax.set_xlabel("click number")
    ax.set_ylabel("mean over cases")
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    title = f"Dice and IoU per click ({summary['num_cases_in_means']} cases"
    if summary["num_cases_without_lesion"]:
        title += f", {summary['num_cases_without_lesion']} without lesion excluded"
    ax.set_title(title + ")")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
