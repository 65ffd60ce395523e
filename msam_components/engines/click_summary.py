"""The pure computation behind an interactive evaluation's summary: Dice/IoU per click, the gain over click 1,
NoC@80/85/90 (clicks needed to reach a Dice, as in RITM and SimpleClick) and click compliance, with the policies the
summary states for cases without lesion, never-reached thresholds and padding clicks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.utils import convert_to_numpy

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


def as_rows(values: Any) -> np.ndarray:
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


def json_number(value: float) -> float | None:
    """Map NaN to None so the JSON files stay standard (no bare NaN tokens)."""
    return None if math.isnan(value) else float(value)
