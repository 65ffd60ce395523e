"""Tests of the interaction metrics (per-click Dice/IoU, NoC, click compliance, Dice gain) and of ClickMetricsHandler
on a real MONAI SupervisedEvaluator run."""

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

from msam_components.engines import click_metrics, click_report
from msam_components.engines.click_metrics import (
    ClickMetricsHandler,
    case_id_from_path,
    case_ids_from_data,
    check_noc_thresholds,
    clicks_to_reach,
    noc_key,
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
# Click labels (1 positive, 0 negative, -1 padding) and compliance (1 obeyed, 0 not, NaN for padding) of each click.
CLICK_LABELS = {
    "case_a": [1, 0, 1],
    "case_b": [1, 1, 0],
    "case_c": [0, 0, -1],  # no lesion: negative clicks on false positives still count for compliance
    "case_d": [1, -1, -1],
    "case_e": [1, 0, 1],
}
COMPLIANCE = {
    "case_a": [1.0, 0.0, 1.0],
    "case_b": [0.0, 1.0, 1.0],
    "case_c": [1.0, 0.0, NAN],
    "case_d": [1.0, NAN, NAN],
    "case_e": [0.0, 0.0, 0.0],
}
# Worked out by hand from the tables above (K = 3; float32(0.9) = 0.8999999762 counts as reaching 0.90).
# NoC@80: a never (3), b 3, d 2, e never (3); NoC@85 and @90: a, d, e never (3), b 3.
EXPECTED_NOC = {"noc_at_80": (2.75, 2), "noc_at_85": (3.0, 3), "noc_at_90": (3.0, 3)}
EXPECTED_NOC_PER_CASE = {
    "case_a": (3, 3, 3),
    "case_b": (3, 3, 3),
    "case_c": None,
    "case_d": (2, 3, 3),
    "case_e": (3, 3, 3),
}
# positive clicks a1 a3 b1 b2 d1 e1 e3 (4 of 7 obeyed); negative a2 b3 c1 c2 e2 (2 of 5); padding c3 d2 d3.
EXPECTED_COMPLIANCE = {
    "compliance_positive": 4 / 7,
    "num_positive_clicks": 7,
    "compliance_negative": 2 / 5,
    "num_negative_clicks": 5,
    "compliance": 6 / 12,
    "num_compliance_clicks": 12,
    "num_padding_clicks": 3,
    "compliance_per_click": [3 / 5, 1 / 4, 2 / 3],
    "compliance_positive_per_click": [2 / 4, 1 / 1, 1 / 2],
    "compliance_negative_per_click": [1 / 1, 0 / 3, 1 / 1],
}
EXPECTED_GAIN_LAST = (0.1 + 0.7 + (0.75 - 0.1234567) + 0.0) / 4


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


def test_noc_by_hand_never_reached_and_no_lesion():
    """Clicks to reach a Dice: first click at or above it, K when never reached (counted), NaN without lesion."""
    dice = np.array(
        [
            [0.90, 0.95, 0.97],  # reached at click 1
            [0.50, 0.85, 0.80],  # reached at click 2 even if it drops afterwards
            [0.10, 0.20, 0.30],  # never: counted as K = 3
            [NAN, NAN, NAN],  # no lesion: excluded, not "never reached"
            [0.2, 0.4, float(np.float32(0.9))],  # float32 0.9 = 0.89999998 reaches 0.90
        ]
    )
    noc, never = clicks_to_reach(dice, 0.85)
    np.testing.assert_array_equal(noc, [1, 2, 3, NAN, 3])
    np.testing.assert_array_equal(never, [False, False, True, False, False])
    noc, never = clicks_to_reach(dice, 0.90)
    np.testing.assert_array_equal(noc, [1, 3, 3, NAN, 3])
    np.testing.assert_array_equal(never, [False, True, True, False, False])
    s = summarise_click_metrics(list("abcde"), dice, dice)
    assert s["noc_thresholds"] == [0.80, 0.85, 0.90]
    assert s["noc_at_80"] == pytest.approx((1 + 2 + 3 + 3) / 4) and s["noc_at_80_num_never_reached"] == 1
    assert s["noc_at_85"] == pytest.approx((1 + 2 + 3 + 3) / 4) and s["noc_at_85_num_never_reached"] == 1
    assert s["noc_at_90"] == pytest.approx((1 + 3 + 3 + 3) / 4) and s["noc_at_90_num_never_reached"] == 2
    assert "never reached" in s["noc_policy"]
    custom = summarise_click_metrics(list("abcde"), dice, dice, noc_thresholds=[0.5, 0.875])
    assert custom["noc_at_50"] == pytest.approx((1 + 1 + 3 + 3) / 4) and custom["noc_at_50_num_never_reached"] == 1
    assert custom["noc_at_87_5"] == pytest.approx((2 + 2 + 3 + 3) / 4) and "noc_at_85" not in custom
    assert noc_key(0.85) == "noc_at_85" and noc_key(0.9) == "noc_at_90" and noc_key(1) == "noc_at_100"
    for bad in ([85], [0.0], [0.8, 0.8], "0.85", [True]):
        with pytest.raises((ValueError, TypeError)):
            check_noc_thresholds(bad)


def test_compliance_by_hand_positive_negative_and_padding():
    """Compliance per click kind and per click index; padding clicks are excluded and counted, any case counts."""
    ids = sorted(CASES)
    s = summarise_click_metrics(
        ids,
        [DICE[c] for c in ids],
        [IOU[c] for c in ids],
        compliance=[COMPLIANCE[c] for c in ids],
        click_labels=[CLICK_LABELS[c] for c in ids],
    )
    assert s["compliance_available"] is True
    for key, value in EXPECTED_COMPLIANCE.items():
        assert s[key] == pytest.approx(value), key
    assert "padding" in s["compliance_policy"]
    # a click whose compliance is undefined (NaN) is not counted even with a real label
    s = summarise_click_metrics(["a"], [[0.5, 0.6]], [[0.4, 0.5]], [[1.0, NAN]], [[1, 0]])
    assert s["compliance_positive"] == 1.0 and s["num_negative_clicks"] == 0 and s["compliance_negative"] is None
    assert s["compliance_negative_per_click"] == [None, None] and s["compliance_positive_per_click"] == [1.0, None]
    json.dumps(s, allow_nan=False)
    # padding clicks are excluded by their label even if an engine gives them a number instead of NaN
    s = summarise_click_metrics(["a"], [[0.5, 0.6, 0.7]], [[0.4, 0.5, 0.6]], [[1.0, 0.0, 0.0]], [[1, -1, 0]])
    assert (s["compliance_positive"], s["num_positive_clicks"]) == (1.0, 1)
    assert (s["compliance_negative"], s["num_negative_clicks"], s["num_padding_clicks"]) == (0.0, 1, 1)
    assert s["compliance_per_click"] == [1.0, None, 0.0]


def test_compliance_absent_is_reported_as_none():
    """Without click_compliance the compliance keys are present and None; one of the pair alone is refused."""
    s = summarise_click_metrics(["a", "b"], [[0.2, 0.9], [0.5, 0.5]], [[0.1, 0.8], [0.3, 0.3]])
    assert s["compliance_available"] is False
    for key in ("compliance", "compliance_positive", "compliance_negative", "num_positive_clicks"):
        assert s[key] is None, key
    assert s["compliance_positive_per_click"] == [None, None]
    assert s["noc_at_85"] == pytest.approx((2 + 2) / 2) and s["noc_at_85_num_never_reached"] == 1
    with pytest.raises(ValueError, match="together"):
        summarise_click_metrics(["a"], [[0.2]], [[0.1]], compliance=[[1.0]])
    with pytest.raises(ValueError, match="match"):
        summarise_click_metrics(["a"], [[0.2, 0.3]], [[0.1, 0.2]], compliance=[[1.0]], click_labels=[[1]])


def test_dice_gain_and_spread_by_hand():
    """Dice gain over click 1 per click and at the last click; min/quartiles/median/max per click over cases."""
    dice = np.array([[0.2, 0.6, 0.4], [0.5, 0.5, 0.9], [0.3, 0.7, 1.0], [0.4, 0.4, 0.1], [NAN, NAN, NAN]])
    s = summarise_click_metrics(list("abcde"), dice, dice * 0.5)
    assert s["dice_first_click"] == pytest.approx(0.35)
    assert s["dice_gain_per_click"] == pytest.approx([0.0, (0.4 + 0.0 + 0.4 + 0.0) / 4, (0.2 + 0.4 + 0.7 - 0.3) / 4])
    assert s["dice_gain_last_click"] == pytest.approx(0.25)
    assert s["dice_gain_last_click"] == pytest.approx(s["dice_last_click"] - s["dice_first_click"])
    assert s["min_dice_per_click"] == pytest.approx([0.2, 0.4, 0.1])
    assert s["max_dice_per_click"] == pytest.approx([0.5, 0.7, 1.0])
    assert s["median_dice_per_click"] == pytest.approx([0.35, 0.55, 0.65])
    assert s["q25_dice_per_click"] == pytest.approx([0.275, 0.475, 0.325])  # linear interpolation, 4 cases
    assert s["q75_dice_per_click"] == pytest.approx([0.425, 0.625, 0.925])
    empty = summarise_click_metrics(["a"], [[NAN, NAN]], [[NAN, NAN]])
    assert empty["dice_gain_last_click"] is None and empty["q25_dice_per_click"] == [None, None]
    assert empty["noc_at_85"] is None and empty["noc_at_85_num_never_reached"] == 0


def _compliance_of(pred: torch.Tensor, point: tuple[int, int, int], label: int) -> float:
    """The contract: 1 if the binarised prediction at the clicked voxel equals the click's label, NaN for padding."""
    return NAN if label < 0 else float(int(pred[0, 0][point].item()) == label)


def test_metrics_from_hand_made_predictions():
    """From binary masks after each click, via MONAI's Dice: NoC, never reached, compliance, padding, gain."""
    from monai.metrics import compute_dice

    cube = torch.zeros(1, 1, 8, 8, 8)
    cube[..., 2:6, 2:6, 2:6] = 1  # 64 voxels
    half = torch.zeros_like(cube)
    half[..., 2:6, 2:6, 2:4] = 1  # 32 voxels inside the cube
    slab = cube.clone()
    slab[..., 6, 2:6, 2:6] = 1  # the cube plus 16 false-positive voxels
    tiny = torch.zeros_like(cube)
    tiny[..., 2:4, 2:4, 2:4] = 1  # 8 voxels inside the cube
    fp = torch.zeros_like(cube)
    fp[..., 0, 0, 0] = 1
    empty = torch.zeros_like(cube)
    cases = {
        # label, then (prediction after the click, clicked voxel, click label) for K = 4 clicks
        "good": (cube, [(half, (3, 3, 3), 1), (slab, (3, 3, 5), 1), (slab, (6, 3, 3), 0), (cube, (6, 3, 3), 0)]),
        "stuck": (cube, [(tiny, (5, 5, 5), 1)] * 4),  # the positive click is never obeyed, Dice 2*8/72 throughout
        "no_lesion": (empty, [(fp, (0, 0, 0), 0), (empty, (0, 0, 0), 0)] + [(empty, (0, 0, 0), -1)] * 2),  # padding
    }
    dice = [[compute_dice(p, lab, ignore_empty=True).item() for p, _, _ in clicks] for lab, clicks in cases.values()]
    compliance = [[_compliance_of(p, pt, lb) for p, pt, lb in clicks] for _, clicks in cases.values()]
    labels = [[lb for _, _, lb in clicks] for _, clicks in cases.values()]
    np.testing.assert_allclose(dice[0], [2 * 32 / 96, 2 * 64 / 144, 2 * 64 / 144, 1.0], rtol=1e-6)
    s = summarise_click_metrics(list(cases), dice, dice, compliance, labels)
    assert s["num_cases_in_means"] == 2 and s["cases_without_lesion"] == ["no_lesion"]
    assert s["noc_at_80"] == pytest.approx((2 + 4) / 2) and s["noc_at_80_num_never_reached"] == 1
    assert s["noc_at_85"] == pytest.approx((2 + 4) / 2) and s["noc_at_85_num_never_reached"] == 1
    assert s["noc_at_90"] == pytest.approx((4 + 4) / 2) and s["noc_at_90_num_never_reached"] == 1
    assert s["compliance_positive"] == pytest.approx(2 / 6) and s["num_positive_clicks"] == 6
    assert s["compliance_negative"] == pytest.approx(2 / 4) and s["num_negative_clicks"] == 4
    assert s["num_padding_clicks"] == 2 and s["compliance_per_click"] == pytest.approx([1 / 3, 2 / 3, 0.0, 1 / 2])
    assert s["dice_gain_last_click"] == pytest.approx((1 - 2 / 3 + 0.0) / 2)


def test_case_ids_from_paths_and_keys():
    """File names lose directory and image extension; an explicit 'case' key wins; unknown gives None."""
    assert case_id_from_path("/data/kits/case_00012.nii.gz") == "case_00012"
    assert case_id_from_path("img.v2.nrrd") == "img.v2"
    image = MetaTensor(torch.zeros(2, 1, 2, 2, 2), meta={"filename_or_obj": ["/a/p1.nii.gz", "/a/p2.nii"]})
    assert case_ids_from_data({"image": image}) == ["p1", "p2"]
    assert case_ids_from_data({"image": image, "case": ["k1", "k2"]}) == ["k1", "k2"]
    assert case_ids_from_data([{"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/q/s.mha"})}]) == ["s"]
    assert case_ids_from_data({"image": torch.zeros(2)}) is None


TABLES = {
    "click_dice": (DICE, torch.float32),
    "click_iou": (IOU, torch.float32),
    "click_compliance": (COMPLIANCE, torch.float32),
    "click_labels": (CLICK_LABELS, torch.int64),
}


def _dataset() -> list[dict]:
    data = []
    for case in CASES:
        image = MetaTensor(torch.rand(1, 4, 4, 4), meta={"filename_or_obj": f"/data/imagesTr/{case}.nii.gz"})
        data.append({"image": image, "label": (image > 0.5).float(), **{k: t[case] for k, (t, _) in TABLES.items()}})
    return data


def _collate_values(batch: list[dict]) -> dict:
    """Collate like monai.data.list_data_collate but keep the per-case click tables as [B, K] tensors."""
    from monai.data import list_data_collate

    tables = {k: torch.tensor([b[k] for b in batch], dtype=dtype) for k, (_, dtype) in TABLES.items()}
    out = list_data_collate([{k: v for k, v in b.items() if k not in tables} for b in batch])
    out["known"] = tables
    return out


def _iteration_update(engine, batchdata: dict, with_compliance: bool = True) -> dict:
    """Stand-in for the click simulator: returns the contract dict with known per-click values."""
    image = batchdata["image"].to(engine.state.device)
    keys = list(TABLES) if with_compliance else ["click_dice", "click_iou"]
    engine.state.output = {
        "image": image,
        "label": batchdata["label"],
        "pred": (image > 0.5).float(),
        "click_points": torch.zeros(image.shape[0], 3, 3, dtype=torch.int64),
        **{k: batchdata["known"][k] for k in keys},
    }
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates (when asked) on this event
    return engine.state.output


def _run(tmp_path: Path, decollate: bool, with_compliance: bool = True, **handler_kwargs) -> SupervisedEvaluator:
    loader = DataLoader(_dataset(), batch_size=2, shuffle=False, num_workers=0, collate_fn=_collate_values)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        iteration_update=lambda engine, batch: _iteration_update(engine, batch, with_compliance),
        decollate=decollate,
    )
    ClickMetricsHandler(output_dir=tmp_path, **handler_kwargs).attach(evaluator)
    evaluator.run()
    return evaluator


def _fmt(v: float) -> str:
    return f"{v:.6f}"


@pytest.mark.parametrize("decollate, with_compliance", [(True, True), (False, True), (True, False)])
def test_handler_on_supervised_evaluator(tmp_path: Path, decollate: bool, with_compliance: bool):
    """A real evaluator run writes exactly the known values, sorted, plus JSON files, plot and engine metrics."""
    evaluator = _run(tmp_path, decollate, with_compliance)
    assert isinstance(evaluator.state.output, list) == decollate  # the layout the handler had to handle

    with open(tmp_path / "click_metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    header = ["case"] + [f"dice_click_{i}" for i in (1, 2, 3)] + [f"iou_click_{i}" for i in (1, 2, 3)]
    header += ["noc_at_80", "noc_at_85", "noc_at_90"]
    if with_compliance:
        header += [f"label_click_{i}" for i in (1, 2, 3)] + [f"compliance_click_{i}" for i in (1, 2, 3)]
    assert rows[0] == header
    assert [r[0] for r in rows[1:]] == sorted(CASES)
    for row in rows[1:]:
        case = row[0]
        assert row[1:7] == [_fmt(float(np.float32(v))) for v in DICE[case] + IOU[case]]
        noc = EXPECTED_NOC_PER_CASE[case]
        assert row[7:10] == (["nan"] * 3 if noc is None else [str(n) for n in noc]), case
        if with_compliance:
            assert row[10:13] == [str(v) for v in CLICK_LABELS[case]]
            assert row[13:16] == ["nan" if math.isnan(v) else str(int(v)) for v in COMPLIANCE[case]]
    assert rows[1 + sorted(CASES).index("case_d")][1] == "0.123457"
    assert rows[1 + sorted(CASES).index("case_c")][1:10] == ["nan"] * 9

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
    assert summary["dice_gain_last_click"] == pytest.approx(EXPECTED_GAIN_LAST, abs=1e-6)
    assert summary["dice_gain_per_click"] == pytest.approx((dice - dice[:, :1]).mean(axis=0).tolist(), abs=1e-6)
    assert summary["q75_dice_per_click"] == pytest.approx(np.percentile(dice, 75, axis=0).tolist(), abs=1e-6)
    for key, (mean, never) in EXPECTED_NOC.items():
        assert summary[key] == pytest.approx(mean) and summary[f"{key}_num_never_reached"] == never, key
    assert summary["compliance_available"] is with_compliance
    for key, value in EXPECTED_COMPLIANCE.items():
        assert summary[key] == (pytest.approx(value) if with_compliance else [None] * 3 if "per_click" in key else None)
    assert (tmp_path / "click_metrics_summary.json").read_text().startswith('{\n    "')  # indent 4

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dice_last_click"]["mean"] == pytest.approx(0.6375, abs=1e-6)
    assert metrics["dice_last_click"]["per_case"]["case_b"] == pytest.approx(0.9, abs=1e-6)
    assert metrics["dice_last_click"]["per_case"]["case_c"] is None
    assert metrics["iou_last_click"]["per_case"]["case_a"] == pytest.approx(0.4, abs=1e-6)
    assert sorted(metrics["iou_last_click"]["per_case"]) == sorted(CASES)
    assert metrics["dice_gain_last_click"]["mean"] == pytest.approx(EXPECTED_GAIN_LAST, abs=1e-6)
    assert metrics["dice_gain_last_click"]["per_case"]["case_b"] == pytest.approx(0.7, abs=1e-6)
    assert metrics["noc_at_80"] == {
        "mean": 2.75,
        "num_never_reached": 2,
        "per_case": {"case_a": 3.0, "case_b": 3.0, "case_c": None, "case_d": 2.0, "case_e": 3.0},
    }
    if with_compliance:
        assert metrics["compliance_positive"] == {"mean": pytest.approx(4 / 7), "num_clicks": 7}
        assert metrics["compliance_negative"] == {"mean": pytest.approx(2 / 5), "num_clicks": 5}
    else:
        assert metrics["compliance_negative"] == {"mean": None, "num_clicks": None}

    png = (tmp_path / "click_metrics.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert int.from_bytes(png[16:20], "big") == 1500  # IHDR width: the three panels (Dice, compliance, NoC)
    assert not list(tmp_path.glob("*.tmp"))

    state = evaluator.state.metrics
    assert state["dice_last_click"] == pytest.approx(0.6375, abs=1e-6)
    assert state["dice_best_over_clicks"] == pytest.approx(0.675, abs=1e-6)
    assert state["iou_last_click"] == pytest.approx(iou[:, -1].mean(), abs=1e-6)
    assert state["dice_gain_last_click"] == pytest.approx(EXPECTED_GAIN_LAST, abs=1e-6)
    assert state["noc_at_85"] == 3.0 and state["noc_at_80"] == 2.75
    if with_compliance:
        assert state["compliance_positive"] == pytest.approx(4 / 7) and state["compliance_negative"] == 0.4
    else:
        assert math.isnan(state["compliance_positive"]) and math.isnan(state["compliance_negative"])


def test_handler_custom_noc_thresholds_and_bad_compliance_shape(tmp_path: Path):
    """noc_thresholds picks the NoC columns and keys; compliance arrays of the wrong shape are refused."""
    _run(tmp_path, decollate=True, noc_thresholds=[0.3, 0.75], save_plot=False)
    with open(tmp_path / "click_metrics.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert [k for k in rows["case_a"] if k.startswith("noc_")] == ["noc_at_30", "noc_at_75"]
    assert [rows[c]["noc_at_75"] for c in sorted(CASES)] == ["3", "3", "nan", "2", "3"]
    assert [rows[c]["noc_at_30"] for c in sorted(CASES)] == ["1", "2", "nan", "2", "1"]
    summary = json.loads((tmp_path / "click_metrics_summary.json").read_text())
    assert summary["noc_thresholds"] == [0.3, 0.75] and summary["noc_at_30"] == pytest.approx(6 / 4)
    assert summary["noc_at_75_num_never_reached"] == 2 and "noc_at_85" not in summary
    with pytest.raises(ValueError):
        ClickMetricsHandler(output_dir=tmp_path, noc_thresholds=[85, 90])

    def short(output):
        return [o["click_compliance"][:2] for o in output], [o["click_labels"][:2] for o in output]

    with pytest.raises(ValueError, match="click_compliance"):
        _run(tmp_path, decollate=True, compliance_transform=short)


def test_gather_across_ranks_keeps_compliance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The DDP gather carries compliance and labels; a case repeated by distributed padding is counted once."""
    gathered = []

    def fake_all_gather(local):
        other = {  # rank 1 evaluated case_a twice over (padding) plus case_z
            "cases": ["case_z", "case_a"],
            "dice": [[0.9, 0.9, 0.9], [0.0, 0.0, 0.0]],
            "iou": [[0.8, 0.8, 0.8], [0.0, 0.0, 0.0]],
            "compliance": [[1.0, 1.0, NAN], [0.0, 0.0, 0.0]],
            "labels": [[0.0, 0.0, -1.0], [1.0, 1.0, 1.0]],
        }
        gathered.append(local)
        return [local, other]

    monkeypatch.setattr(click_metrics.idist, "all_gather", fake_all_gather)
    evaluator = _run(tmp_path, decollate=True, save_plot=False)
    assert gathered and gathered[0]["compliance"][0] is not None
    summary = json.loads((tmp_path / "click_metrics_summary.json").read_text())
    assert summary["num_cases"] == 6 and summary["num_negative_clicks"] == 5 + 2
    assert summary["compliance_negative"] == pytest.approx((2 + 2) / 7)
    assert summary["compliance_positive"] == pytest.approx(4 / 7)  # rank 1's repeat of case_a dropped
    assert summary["num_padding_clicks"] == 4 and summary["noc_at_90"] == pytest.approx((3 * 4 + 1) / 5)
    assert evaluator.state.metrics["noc_at_90"] == pytest.approx(13 / 5)

    def mixed_all_gather(local):  # one rank's engine gave no compliance: not reported, with a warning
        other = {"cases": ["case_z"], "dice": [[0.9] * 3], "iou": [[0.8] * 3], "compliance": [None], "labels": [None]}
        return [local, other]

    monkeypatch.setattr(click_metrics.idist, "all_gather", mixed_all_gather)
    evaluator.run()
    summary = json.loads((tmp_path / "click_metrics_summary.json").read_text())
    assert summary["num_cases"] == 6 and summary["compliance_available"] is False
    assert summary["compliance_positive"] is None


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

    monkeypatch.setattr(click_report.json, "dump", broken_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        handler.write(cases, dice, iou, summary)
    assert not (tmp_path / "click_metrics_summary.json").exists()
    assert not (tmp_path / "metrics.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.undo()
    handler.write(cases, dice, iou, summary)
    good = (tmp_path / "click_metrics_summary.json").read_text()
    monkeypatch.setattr(click_report.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        handler.write(cases, dice, iou, summarise_click_metrics(cases, dice * 0, iou * 0))
    assert (tmp_path / "click_metrics_summary.json").read_text() == good
    assert json.loads(good)["dice_last_click"] == pytest.approx(0.3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert math.isclose(json.loads(good)["dice_best_over_clicks"], 0.3)
