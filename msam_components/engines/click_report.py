"""The files an interactive evaluation writes: names, strict JSON, the per-case CSV and the per-click plot."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .click_summary import noc_key

CSV_NAME = "click_metrics.csv"
SUMMARY_NAME = "click_metrics_summary.json"
METRICS_NAME = "metrics.json"
PLOT_NAME = "click_metrics.png"


def dump_json(obj: Any, f: Any) -> None:
    """Dump strict JSON with indent 4 (the project's convention)."""
    json.dump(obj, f, indent=4, allow_nan=False)
    f.write("\n")


def write_csv(
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


def plot_png(summary: dict[str, Any]) -> bytes:
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
