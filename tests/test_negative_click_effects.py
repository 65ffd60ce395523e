"""negative_click_effects (experiments/negative_clicks.py, the learning test) on hand-made predictions."""

from __future__ import annotations

import math
from functools import partial

import torch

from msam_components.engines import binarise, negative_click_effects


def test_cleared_region_and_kept_rest_by_hand() -> None:
    label = torch.zeros(16, 16, 16, dtype=torch.bool)
    label[2:6, 2:6, 2:6] = True  # the lesion: 64 voxels
    before = torch.full((16, 16, 16), -3.0)
    before[2:6, 2:6, 2:6] = 3.0  # the lesion found
    before[10:14, 10:14, 10:14] = 3.0  # a false positive: 64 voxels
    after = before.clone()
    after[10:14, 10:14, 10:12] = -3.0  # half of the false positive cleared
    after[2:6, 2:6, 2:3] = -3.0  # a quarter of the rest lost
    logits = torch.stack([before, after, after])
    points = torch.tensor([[3, 3, 3], [11, 11, 11], [0, 0, 0]])
    labels = torch.tensor([1, 0, 0])  # click 3: negative, but not in a false positive of click 2's mask
    assert negative_click_effects(logits, points, labels, label) == [(2, 64, 0.5, 0.75)]
    only_fp = torch.stack([before.masked_fill(label, -3.0), after.masked_fill(label, -3.0)])
    (effect,) = negative_click_effects(only_fp, points[:2], labels[:2], label)
    assert effect[:3] == (2, 64, 0.5) and math.isnan(effect[3])  # no rest of the mask to keep


def test_the_binarisation_is_the_callers() -> None:
    """A probability threshold of 0.99 (logit 4.6) makes the 3.0 logits background: nothing was predicted before."""
    label = torch.zeros(8, 8, 8, dtype=torch.bool)
    before = torch.full((8, 8, 8), -3.0)
    before[4:7, 4:7, 4:7] = 3.0
    logits = torch.stack([before, torch.full_like(before, -3.0)])
    points, labels = torch.tensor([[5, 5, 5], [5, 5, 5]]), torch.tensor([1, 0])
    (effect,) = negative_click_effects(logits, points, labels, label)
    assert effect[:3] == (2, 27, 1.0)
    strict = partial(binarise, threshold=0.99, threshold_on="probability")
    assert negative_click_effects(logits, points, labels, label, strict) == []
