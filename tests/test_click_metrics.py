"""Tests of the per-click Dice/IoU summary and of ClickMetricsHandler on a real MONAI SupervisedEvaluator run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.handlers import from_engine

from msam_components.engines import click_metrics
from msam_components.engines.click_metrics import (
    ClickMetricsHandler,
    case_id_from_path,
    case_ids_from_data,
    summarise_click_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

# Five cases in a deliberately unsorted order; "case_c" has no lesion (NaN everywhere). K = 3 clicks.
CASES = ["case_d", "case_b", "case_e", "case_a", "case_c"]
DICE = {
    "case_a": [0.50, 0.70, 0.60],
    "case_b": [0.20, 0.40, 0.90],
    "case_c": [NAN, NAN, NAN],
    "case_d": [0.1234567, 0.80, 0.75],
    "case_e": [0.30, 0.30, 0.30],
}
IOU = {
    "case_a": [0.30, 0.50, 0.40],
    "case_b": [0.10, 0.25, 0.80],
    "case_c": [NAN, NAN, NAN],
    "case_d": [0.05, 0.65, 0.60],
    "case_e": [0.20, 0.20, 0.20],
}
LESION_CASES = ["case_a", "case_b", "case_d", "case_e"]


def test_summary_numbers_by_hand():
    """Means per click, last click, best over clicks; the NaN case is excluded from means and counted."""
    ids = ["x", "y", "z"]
    dice = np.array([[0.2, 0.6, 0.4], [0.5, 0.5, 0.9], [NAN, NAN, NAN]])
    iou = np.array([[0.1, 0.5, 0.3], [0.4, 0.3, 0.8], [NAN, NAN, NAN]])
    s = summarise_click_metrics(ids, dice, iou)
    assert s["num_cases"] == 3 and s["num_clicks"] == 3 and s["num_cases_in_means"] == 2
    assert s["mean_dice_per_click"] == pytest.approx([0.35, 0.55, 0.65])
    assert s["mean_iou_per_click"] == pytest.approx([0.25, 0.4, 0.55])
    assert s["dice_last_click"] == pytest.approx(0.65)
    assert s["iou_last_click"] == pytest.approx(0.55)
    assert s["dice_best_over_clicks"] == pytest.approx((0.6 + 0.9) / 2)
    assert s["iou_best_over_clicks"] == pytest.approx((0.5 + 0.8) / 2)
    assert s["num_cases_without_lesion"] == 1 and s["cases_without_lesion"] == ["z"]
    assert "excluded" in s["no_lesion_policy"]
    assert "SAM-Med3D" in s["best_over_clicks_protocol"] and "optimistic" in s["best_over_clicks_protocol"]
    json.dumps(s, allow_nan=False)  # JSON-ready, no NaN tokens


def test_summary_all_cases_without_lesion_and_bad_shapes():
    """No evaluable case gives None means (not NaN); mismatched inputs are rejected."""
    s = summarise_click_metrics(["a"], [[NAN, NAN]], [[NAN, NAN]])
    assert s["dice_last_click"] is None and s["mean_dice_per_click"] == [None, None]
    assert s["num_cases_without_lesion"] == 1
    with pytest.raises(ValueError):
        summarise_click_metrics(["a"], [[0.1, 0.2]], [[0.1]])
    with pytest.raises(ValueError):
        summarise_click_metrics(["a", "b"], [[0.1, 0.2]], [[0.1, 0.2]])


def test_case_ids_from_paths_and_keys():
    """File names lose directory and image extension; an explicit 'case' key wins; unknown gives None."""
    assert case_id_from_path("/data/kits/case_00012.nii.gz") == "case_00012"
    assert case_id_from_path("img.v2.nrrd") == "img.v2"
    image = MetaTensor(torch.zeros(2, 1, 2, 2, 2), meta={"filename_or_obj": ["/a/p1.nii.gz", "/a/p2.nii"]})
    assert case_ids_from_data({"image": image}) == ["p1", "p2"]
    assert case_ids_from_data({"image": image, "case": ["k1", "k2"]}) == ["k1", "k2"]
    assert case_ids_from_data([{"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/q/s.mha"})}]) == ["s"]
    assert case_ids_from_data({"image": torch.zeros(2)}) is None


def _dataset() -> list[dict]:
    data = []
    for case in CASES:
        image = MetaTensor(torch.rand(1, 4, 4, 4), meta={"filename_or_obj": f"/data/imagesTr/{case}.nii.gz"})
        data.append({"image": image, "label": (image > 0.5).float(), "click_dice": DICE[case], "click_iou": IOU[case]})
    return data


def _collate_values(batch: list[dict]) -> dict:
    """Collate like monai.data.list_data_collate but keep the per-case click tables as [B, K] tensors."""
    from monai.data import list_data_collate

    tables = {k: torch.tensor([b[k] for b in batch], dtype=torch.float32) for k in ("click_dice", "click_iou")}
    out = list_data_collate([{k: v for k, v in b.items() if k not in tables} for b in batch])
    out["known"] = tables
    return out


def _iteration_update(engine, batchdata: dict) -> dict:
    """Stand-in for the click simulator: returns the contract dict with known per-click Dice/IoU."""
    image = batchdata["image"].to(engine.state.device)
    engine.state.output = {
        "image": image,
        "label": batchdata["label"],
        "pred": (image > 0.5).float(),
        "click_dice": batchdata["known"]["click_dice"],
        "click_iou": batchdata["known"]["click_iou"],
    }
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates (when asked) on this event
    return engine.state.output


def _run(tmp_path: Path, decollate: bool, **handler_kwargs) -> SupervisedEvaluator:
    loader = DataLoader(_dataset(), batch_size=2, shuffle=False, num_workers=0, collate_fn=_collate_values)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        iteration_update=_iteration_update,
        decollate=decollate,
    )
    ClickMetricsHandler(output_dir=tmp_path, **handler_kwargs).attach(evaluator)
    evaluator.run()
    return evaluator


def _fmt(v: float) -> str:
    return f"{v:.6f}"


@pytest.mark.parametrize("decollate", [True, False])
def test_handler_on_supervised_evaluator(tmp_path: Path, decollate: bool):
    """A real evaluator run writes exactly the known values, sorted, plus JSON files, plot and engine metrics."""
    evaluator = _run(tmp_path, decollate)
    assert isinstance(evaluator.state.output, list) == decollate  # the layout the handler had to handle

    with open(tmp_path / "click_metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    header = ["case"] + [f"dice_click_{i}" for i in (1, 2, 3)] + [f"iou_click_{i}" for i in (1, 2, 3)]
    assert rows[0] == header
    assert [r[0] for r in rows[1:]] == sorted(CASES)
    for row in rows[1:]:
        assert row[1:] == [_fmt(float(np.float32(v))) for v in DICE[row[0]] + IOU[row[0]]]
    assert rows[1 + sorted(CASES).index("case_d")][1] == "0.123457"
    assert rows[1 + sorted(CASES).index("case_c")][1:] == ["nan"] * 6

    summary = json.loads((tmp_path / "click_metrics_summary.json").read_text())
    assert summary["num_cases"] == 5 and summary["num_clicks"] == 3
    assert summary["num_cases_without_lesion"] == 1 and summary["cases_without_lesion"] == ["case_c"]
    dice = np.array([DICE[c] for c in LESION_CASES])
    iou = np.array([IOU[c] for c in LESION_CASES])
    assert summary["dice_last_click"] == pytest.approx(dice[:, -1].mean(), abs=1e-6)  # (0.6+0.9+0.75+0.3)/4
    assert summary["dice_last_click"] == pytest.approx(0.6375, abs=1e-6)
    assert summary["dice_best_over_clicks"] == pytest.approx((0.7 + 0.9 + 0.8 + 0.3) / 4, abs=1e-6)
    assert summary["iou_last_click"] == pytest.approx(iou[:, -1].mean(), abs=1e-6)
    assert summary["iou_best_over_clicks"] == pytest.approx(iou.max(axis=1).mean(), abs=1e-6)
    assert summary["mean_dice_per_click"] == pytest.approx(dice.mean(axis=0).tolist(), abs=1e-6)
    assert summary["mean_iou_per_click"] == pytest.approx(iou.mean(axis=0).tolist(), abs=1e-6)
    assert (tmp_path / "click_metrics_summary.json").read_text().startswith('{\n    "')  # indent 4

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dice_last_click"]["mean"] == pytest.approx(0.6375, abs=1e-6)
    assert metrics["dice_last_click"]["per_case"]["case_b"] == pytest.approx(0.9, abs=1e-6)
    assert metrics["dice_last_click"]["per_case"]["case_c"] is None
    assert metrics["iou_last_click"]["per_case"]["case_a"] == pytest.approx(0.4, abs=1e-6)
    assert sorted(metrics["iou_last_click"]["per_case"]) == sorted(CASES)

    png = (tmp_path / "click_metrics.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert not list(tmp_path.glob("*.tmp"))

    assert evaluator.state.metrics["dice_last_click"] == pytest.approx(0.6375, abs=1e-6)
    assert evaluator.state.metrics["dice_best_over_clicks"] == pytest.approx(0.675, abs=1e-6)
    assert evaluator.state.metrics["iou_last_click"] == pytest.approx(iou[:, -1].mean(), abs=1e-6)


def test_handler_options_prefix_summary_only_and_transforms(tmp_path: Path):
    """prefix renames files, summary_only writes only the summary, custom transforms are used, epochs reset."""
    seen = []

    def ids(data):
        ids = case_ids_from_data(data)
        seen.append(len(ids))
        return [f"p_{i}" for i in ids]

    evaluator = _run(
        tmp_path,
        decollate=True,
        prefix="val_",
        summary_only=True,
        output_transform=from_engine(["click_dice", "click_iou"]),
        case_transform=ids,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val_click_metrics_summary.json"]
    summary = json.loads((tmp_path / "val_click_metrics_summary.json").read_text())
    assert summary["cases_without_lesion"] == ["p_case_c"] and seen == [2, 2, 1]
    evaluator.run()  # a second epoch must not double-count
    assert json.loads((tmp_path / "val_click_metrics_summary.json").read_text())["num_cases"] == 5


def test_handler_falls_back_to_index_ids(tmp_path: Path):
    """Without filename meta or a case key, ids are case_<global index> in loader order."""

    def no_ids(_data):
        return None

    evaluator = _run(tmp_path, decollate=True, case_transform=no_ids, save_plot=False)
    evaluator.run()  # a second epoch restarts the collection (and the index)
    with open(tmp_path / "click_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [f"case_{i:05d}" for i in range(5)]
    assert [float(r["dice_click_1"]) for r in rows[:2]] == pytest.approx([0.123457, 0.2], abs=1e-9)
    assert not (tmp_path / "click_metrics.png").exists()


def test_crash_during_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """If json.dump raises mid-write, the target is absent (or the old file intact) and no temp file remains."""

    def broken_dump(obj, f, **kwargs):
        f.write('{"half": ')
        raise RuntimeError("disk full")

    handler = ClickMetricsHandler(output_dir=tmp_path, save_plot=False)
    cases, dice, iou = ["a", "b"], np.array([[0.1, 0.2], [0.3, 0.4]]), np.array([[0.1, 0.1], [0.2, 0.2]])
    summary = summarise_click_metrics(cases, dice, iou)

    monkeypatch.setattr(click_metrics.json, "dump", broken_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        handler.write(cases, dice, iou, summary)
    assert not (tmp_path / "click_metrics_summary.json").exists()
    assert not (tmp_path / "metrics.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.undo()
    handler.write(cases, dice, iou, summary)
    good = (tmp_path / "click_metrics_summary.json").read_text()
    monkeypatch.setattr(click_metrics.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        handler.write(cases, dice, iou, summarise_click_metrics(cases, dice * 0, iou * 0))
    assert (tmp_path / "click_metrics_summary.json").read_text() == good
    assert json.loads(good)["dice_last_click"] == pytest.approx(0.3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert math.isclose(json.loads(good)["dice_best_over_clicks"], 0.3)
