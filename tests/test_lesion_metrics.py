"""Per-lesion detection and Dice (issue 13 item 4): against hand-made predictions, and through an evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msam_components.engines import LesionMetricsHandler, lesion_detection, summarise_lesions


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


SHAPE = (20, 20, 20)
BIG = _box(SHAPE, (2, 2, 2), (8, 8, 8))  # 216 voxels
SMALL = _box(SHAPE, (12, 12, 12), (14, 14, 14))  # 8 voxels
FALSE = _box(SHAPE, (2, 14, 2), (5, 17, 5))  # 27 voxels, touches no lesion


def test_found_missed_false_and_per_lesion_dice() -> None:
    half = _box(SHAPE, (2, 2, 2), (8, 8, 5))  # half of the big lesion
    result = lesion_detection(half | FALSE, BIG | SMALL)
    assert (result["found"], result["missed"], result["false"]) == (1, 1, 1)
    assert result["lesion_dice"] == pytest.approx([2 * 108 / (216 + 108), 0.0])


def test_one_object_over_two_lesions_counts_for_both_and_an_empty_prediction_finds_nothing() -> None:
    bridge = BIG | SMALL | _box(SHAPE, (7, 7, 7), (13, 13, 13))
    result = lesion_detection(bridge, BIG | SMALL)
    assert (result["found"], result["missed"], result["false"]) == (2, 0, 0)
    assert all(0 < d < 1 for d in result["lesion_dice"])
    assert lesion_detection(np.zeros(SHAPE), BIG | SMALL) == {
        "found": 0,
        "missed": 2,
        "false": 0,
        "lesion_dice": [0, 0],
    }
    assert lesion_detection(FALSE, np.zeros(SHAPE)) == {"found": 0, "missed": 0, "false": 1, "lesion_dice": []}
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_detection(np.zeros((4, 4, 4)), BIG)


def test_summary_over_cases() -> None:
    cases = [lesion_detection(BIG, BIG | SMALL), lesion_detection(BIG | FALSE, BIG)]
    summary = summarise_lesions(cases)
    assert (summary["num_lesions"], summary["lesions_found"], summary["lesions_missed"]) == (3, 2, 1)
    assert summary["false_lesions"] == 1 and summary["false_lesions_per_case"] == 0.5
    assert summary["detection_rate"] == pytest.approx(2 / 3)
    assert summary["mean_lesion_dice"] == pytest.approx(2 / 3)
    assert summarise_lesions([])["mean_lesion_dice"] is None


def test_handler_writes_the_summary_from_an_evaluator(tmp_path: Path) -> None:
    """Logits of the last click (threshold 0.5 on logits, as the click loop) and labels from an engine's output."""
    from ignite.engine import Engine

    label = torch.as_tensor((BIG | SMALL)[None], dtype=torch.float32)
    logits = torch.where(torch.as_tensor((BIG | FALSE)[None]), 4.0, -4.0)
    outputs = [{"pred": logits, "label": label}, {"pred": torch.full_like(logits, 0.4), "label": label}]  # 0.4: below

    engine = Engine(lambda e, batch: [batch])  # a decollated output: a list of per-case dicts
    handler = LesionMetricsHandler(output_dir=tmp_path)
    handler.attach(engine)
    engine.run(outputs, max_epochs=1)
    summary = json.loads((tmp_path / "lesion_metrics.json").read_text())
    assert (summary["num_cases"], summary["lesions_found"], summary["lesions_missed"]) == (2, 1, 3)
    assert summary["false_lesions"] == 1
    assert engine.state.metrics["lesion_detection_rate"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="threshold_on"):
        LesionMetricsHandler(tmp_path, threshold_on="logit")
