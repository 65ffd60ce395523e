"""Tests for the click simulation: functional API (msam_components.clicks.sampling) and the SimulateClickd dictionary transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from msam_components.transforms import (
    PADDING_LABEL,
    Click,
    SimulateClickd,
    error_regions,
    sample_click,
    sample_clicks_batch,
)

SHAPE = (32, 32, 32)


def _sphere(center: tuple[int, int, int], radius: float, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """Boolean ball mask, used as an irregular (non-box) lesion."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"))
    c = torch.tensor(center).view(3, 1, 1, 1)
    return ((grid - c) ** 2).sum(0) <= radius**2


def _box(slices: tuple[slice, slice, slice], shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """Boolean box mask."""
    m = torch.zeros(shape, dtype=torch.bool)
    m[slices] = True
    return m


def _logits(fg: torch.Tensor) -> torch.Tensor:
    """Confident logits [1,D,H,W] that are foreground exactly on ``fg``."""
    return torch.where(fg, 6.0, -6.0)[None]


def _at(mask: torch.Tensor, point: torch.Tensor) -> bool:
    """Value of a [D,H,W] mask at a (d,h,w) point."""
    d, h, w = point.tolist()
    return bool(mask[d, h, w])


@pytest.fixture()
def fn_fp_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label with a predicted part and a missed part (FN, 3x the FP volume), plus a spurious FP block."""
    fn = _box((slice(2, 14), slice(2, 10), slice(2, 10)))  # 12*8*8 = 768 voxels
    tp = _box((slice(2, 14), slice(10, 16), slice(2, 10)))
    fp = _box((slice(20, 28), slice(20, 28), slice(20, 24)))  # 8*8*4 = 256 voxels
    label = (fn | tp).float()[None]
    pred = _logits(tp | fp)
    return pred, label, fn, fp


# ---------------------------------------------------------------------------------------------------- error regions


def test_error_regions_masks(fn_fp_case):
    pred, label, fn, fp = fn_fp_case
    got_fn, got_fp = error_regions(pred, label)
    assert got_fn.dtype == torch.bool and got_fn.shape == SHAPE and got_fp.shape == SHAPE
    assert torch.equal(got_fn, fn) and torch.equal(got_fp, fp)
    # no prediction: everything in the lesion is missed, nothing is spurious; [D,H,W] inputs work too
    first_fn, first_fp = error_regions(None, label[0])
    assert torch.equal(first_fn, label[0] > 0) and not first_fp.any()


def test_threshold_on_logits_vs_probability():
    lesion = _box((slice(8, 16), slice(8, 16), slice(8, 16)))
    label = lesion.float()[None]
    pred = torch.full((1, *SHAPE), 0.3)  # logit 0.3: not > 0.5, but sigmoid(0.3) ~ 0.574 > 0.5
    fn_l, fp_l = error_regions(pred, label, threshold=0.5, threshold_on="logits")
    assert torch.equal(fn_l, lesion) and not fp_l.any()
    fn_p, fp_p = error_regions(pred, label, threshold=0.5, threshold_on="probability")
    assert not fn_p.any() and torch.equal(fp_p, ~lesion)

    click_l = sample_click(pred, label, np.random.RandomState(0), threshold_on="logits")
    assert click_l.label == 1 and _at(lesion, click_l.point)
    click_p = sample_click(pred, label, np.random.RandomState(0), threshold_on="probability")
    assert click_p.label == 0 and not _at(lesion, click_p.point)


# ---------------------------------------------------------------------------------------------------- random strategy


def test_first_click_always_inside_lesion():
    lesion = _sphere((11, 19, 14), 5.5)
    label = lesion.to(torch.uint8)[None]
    points = set()
    for seed in range(150):
        click = sample_click(None, label, np.random.RandomState(seed))
        assert isinstance(click, Click) and click.valid and click.label == 1
        assert click.point.dtype == torch.int64 and click.point.shape == (3,)
        assert _at(lesion, click.point)
        points.add(tuple(click.point.tolist()))
    assert len(points) > 50  # really random, not a fixed voxel


def test_later_clicks_in_fn_positive_or_fp_negative_in_proportion(fn_fp_case):
    pred, label, fn, fp = fn_fp_case
    rng = np.random.RandomState(123)
    n, positives = 400, 0
    for _ in range(n):
        click = sample_click(pred, label, rng)
        assert click.valid
        if click.label == 1:
            assert _at(fn, click.point)
            positives += 1
        else:
            assert click.label == 0 and _at(fp, click.point)
    # FN is 3x the FP volume -> ~75% positive clicks (binomial sd ~2.2% for 400 draws)
    assert abs(positives / n - 0.75) < 0.08


def test_pred_with_grad_and_meta_tensors(fn_fp_case):
    pred, label, fn, fp = fn_fp_case
    pred = MetaTensor(pred.clone().requires_grad_(True))
    click = sample_click(pred, MetaTensor(label > 0), np.random.RandomState(0))
    assert type(click.point) is torch.Tensor and click.valid
    assert _at(fn, click.point) if click.label == 1 else _at(fp, click.point)


# ---------------------------------------------------------------------------------------------------- center strategy


def test_center_picks_cube_center_and_is_deterministic():
    cube = _box((slice(5, 14), slice(10, 19), slice(17, 26)))  # 9^3, centre (9, 14, 21)
    label = cube.float()[None]
    first = sample_click(None, label, None, strategy="center")
    assert first == Click(torch.tensor([9, 14, 21]), 1, True)
    # later click: the cube is missed (FN) and a smaller FP blob exists -> positive click at the cube centre
    pred = _logits(_box((slice(25, 28), slice(2, 5), slice(2, 5))))
    again = [sample_click(pred, label, np.random.RandomState(s), strategy="center") for s in range(3)]
    assert all(c == Click(torch.tensor([9, 14, 21]), 1, True) for c in again)


def test_center_larger_region_wins_and_ties_go_to_first_voxel():
    label = _box((slice(2, 6), slice(2, 6), slice(2, 6))).float()[None]  # FN of 64 voxels (not predicted)
    fp = _box((slice(10, 20), slice(10, 20), slice(10, 20)))  # FP of 1000 voxels, even side -> 2^3 tied maxima
    click = sample_click(_logits(fp), label, None, strategy="center")
    assert click == Click(torch.tensor([14, 14, 14]), 0, True)
    # equal-sized FN and FP: the FN wins (positive click)
    same = sample_click(_logits(_box((slice(20, 24), slice(20, 24), slice(20, 24)))), label, None, strategy="center")
    assert same == Click(torch.tensor([3, 3, 3]), 1, True)


def test_center_image_edge_counts_as_boundary():
    slab = _box((slice(0, 5), slice(None), slice(None)))  # touches the image edge on five sides
    click = sample_click(None, slab[None].float(), None, strategy="center")
    # distance to the padded edge: 3 at d=2 and at (h, w) >= 2; the first such voxel in C order is (2, 2, 2)
    assert click == Click(torch.tensor([2, 2, 2]), 1, True)


# ---------------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("strategy", ["random", "center"])
def test_perfect_prediction_gives_padding_without_drawing(strategy):
    lesion = _sphere((16, 16, 16), 6)
    rng = np.random.RandomState(7)
    state = rng.get_state()[1].copy()
    click = sample_click(_logits(lesion), lesion[None].float(), rng, strategy=strategy)
    assert click == Click(torch.zeros(3, dtype=torch.int64), PADDING_LABEL, False)
    assert click.label == -1 and not click.valid
    assert np.array_equal(rng.get_state()[1], state)  # no random number consumed by a padding click


@pytest.mark.parametrize("strategy", ["random", "center"])
def test_empty_lesion(strategy):
    label = torch.zeros(1, *SHAPE)
    first = sample_click(None, label, np.random.RandomState(0), strategy=strategy)
    assert first.label == -1 and not first.valid and first.point.tolist() == [0, 0, 0]
    fp = _box((slice(3, 9), slice(3, 9), slice(3, 9)))
    later = sample_click(_logits(fp), label, np.random.RandomState(0), strategy=strategy)
    assert later.valid and later.label == 0 and _at(fp, later.point)


# ---------------------------------------------------------------------------------------------------- batch


def test_batch_shapes_and_matches_per_sample(fn_fp_case):
    pred1, label1, _, _ = fn_fp_case
    lesion2 = _sphere((20, 12, 16), 4)
    label = torch.stack([label1, lesion2[None].float(), torch.zeros(1, *SHAPE)])  # third: empty lesion
    pred = torch.stack([pred1, _logits(lesion2), torch.full((1, *SHAPE), -3.0)])  # second: perfect -> padding

    points, labels = sample_clicks_batch(pred, label, np.random.RandomState(5))
    assert points.shape == (3, 1, 3) and labels.shape == (3, 1)
    assert points.dtype == torch.int64 and labels.dtype == torch.int64
    assert points.device == label.device and labels.device == label.device
    rng = np.random.RandomState(5)
    expected = [sample_click(pred[b], label[b], rng) for b in range(3)]
    for b, click in enumerate(expected):
        assert torch.equal(points[b, 0], click.point) and labels[b, 0].item() == click.label
    assert labels[1, 0].item() == -1 and labels[2, 0].item() == -1

    first_points, first_labels = sample_clicks_batch(None, label, np.random.RandomState(5), strategy="center")
    assert first_labels.tolist() == [[1], [1], [-1]]
    assert torch.equal(first_points[1, 0], torch.tensor([20, 12, 16]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_on_cuda(fn_fp_case):
    pred, label, fn, fp = (t.cuda() for t in fn_fp_case)
    for strategy in ("random", "center"):
        points, labels = sample_clicks_batch(pred[None], label[None], np.random.RandomState(0), strategy=strategy)
        assert points.is_cuda and labels.is_cuda
        target = fn if labels[0, 0].item() == 1 else fp
        assert _at(target.cpu(), points[0, 0].cpu())


# ---------------------------------------------------------------------------------------------------- transform


def test_transform_reproducible_with_seed(fn_fp_case):
    pred, label, _, _ = fn_fp_case

    def run(seed: int) -> list[list[int]]:
        t = SimulateClickd()
        assert t.set_random_state(seed) is t
        d = {"label": label}
        for _ in range(5):
            d = t(d)
            d["pred"] = pred
        return d["click_points"].tolist()

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_transform_history_accumulates_and_inputs_untouched(fn_fp_case):
    pred, label, fn, fp = fn_fp_case
    label_before = label.clone()
    data = {"label": label, "pred": None}
    t = SimulateClickd(strategy="random").set_random_state(0)
    out1 = t(data)
    assert "click_point" not in data and data["pred"] is None  # input dict untouched
    assert out1["click_point"].shape == (1, 3) and out1["click_label"].tolist() == [1]
    assert _at(label[0] > 0, out1["click_point"][0])

    out2 = t({**out1, "pred": pred})
    out3 = t({**out2, "pred": _logits(label[0] > 0)})  # perfect prediction -> padding click still recorded
    assert out1["click_points"].shape == (1, 3)  # earlier outputs not mutated
    assert out3["click_points"].shape == (3, 3) and out3["click_labels"].shape == (3,)
    assert out3["click_points"].dtype == torch.int64 and out3["click_labels"].dtype == torch.int64
    assert torch.equal(out3["click_points"][1], out2["click_point"][0])
    assert out3["click_labels"].tolist()[:2] == [1, out2["click_label"].item()]
    assert out3["click_labels"][2].item() == -1 and out3["click_point"].tolist() == [[0, 0, 0]]
    assert torch.equal(label, label_before)


def test_transform_custom_keys_center_and_missing_keys():
    cube = _box((slice(5, 14), slice(10, 19), slice(17, 26)))
    keys = {"pred_key": "logits", "point_key": "p", "point_label_key": "pl", "history_points_key": "hp"}
    t = SimulateClickd(label_key="seg", history_labels_key="hl", strategy="center", **keys)
    out = t({"seg": cube[None].float()})
    assert out["p"].tolist() == [[9, 14, 21]] and out["pl"].tolist() == [1]
    assert out["hp"].tolist() == [[9, 14, 21]] and out["hl"].tolist() == [1]

    assert SimulateClickd(allow_missing_keys=True)({"image": 1}) == {"image": 1}
    with pytest.raises(KeyError):
        SimulateClickd()({"image": 1})


def test_transform_draws_the_clicks_the_engines_simulator_draws():
    """SimulateClickd is ClickSimulator on one sample: the same seed gives the same clicks, mixtures included."""
    from msam_components.transforms import ClickSimulator

    lesions = _sphere((8, 8, 8), 4) | _sphere((22, 22, 22), 5)
    label = lesions.float()[None]
    preds = [None, _logits(_sphere((8, 8, 8), 4)), _logits(_sphere((8, 8, 8), 3) | _box((slice(0, 4),) * 3))]
    mixture = {"random": 1.0, "center": 1.0, "interior": 2.0}
    t = SimulateClickd(strategy=mixture).set_random_state(7)
    sim = ClickSimulator(label[None], np.random.RandomState(7), strategy=mixture)
    d = {"label": label}
    for k, pred in enumerate(preds):
        d = t({**d, "pred": pred})
        points, labels = sim(k, None if pred is None else pred[None])
        assert d["click_point"].tolist() == points[0].tolist() and d["click_label"].tolist() == labels[0].tolist()


def test_transform_clicked_target_follows_the_positive_clicks():
    """With target="clicked" the target holds the lesions touched by a positive click so far, and nothing else."""
    small, large = _sphere((8, 8, 8), 3), _sphere((22, 22, 22), 5)
    t = SimulateClickd(strategy="center", target="clicked", target_key="target")
    out = t({"label": (small | large).float()[None]})
    assert _at(large, out["click_point"][0]) and torch.equal(out["target"][0] > 0, large)
    out = t({**out, "pred": _logits(large)})
    assert _at(small, out["click_point"][0]) and torch.equal(out["target"][0] > 0, small | large)
    with pytest.raises(ValueError, match="target"):
        SimulateClickd(target="lesions")


# ---------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"strategy": "centre"}, "centre"),
        ({"threshold_on": "logit"}, "logit"),
        ({"threshold": float("nan")}, "nan"),
        ({"threshold": 1.5, "threshold_on": "probability"}, "1.5"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, bad):
    label = torch.zeros(1, *SHAPE)
    with pytest.raises(ValueError, match=bad):
        sample_click(None, label, np.random.RandomState(0), **kwargs)
    with pytest.raises(ValueError, match=bad):
        sample_clicks_batch(None, label[None], np.random.RandomState(0), **kwargs)
    with pytest.raises(ValueError, match=bad):
        SimulateClickd(**kwargs)


def test_bad_shapes_raise_value_error():
    label = torch.zeros(1, *SHAPE)
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 32\)"):
        sample_click(None, torch.zeros(2, *SHAPE), np.random.RandomState(0))
    with pytest.raises(ValueError, match=r"\(16, 16, 16\)"):
        error_regions(torch.zeros(16, 16, 16), label)
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 32\)"):
        sample_clicks_batch(None, label, np.random.RandomState(0))
    with pytest.raises(TypeError, match="RandomState"):
        sample_click(None, label, None, strategy="random")
    with pytest.raises(ValueError, match="history points"):
        SimulateClickd()({"label": label, "click_points": torch.zeros(2, 2)})
