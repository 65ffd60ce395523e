"""The training-click recipe: interior clicks, strategy mixtures, click-dependent targets, starting masks, feedback
dropout, the point loss, click compliance, and the cumulative inference mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import small_msam_kwargs
from scipy import ndimage

from msam_components.clicks.sampling import sample_click
from msam_components.clicks.simulator import ClickSimulator, check_strategy, click_compliance
from msam_components.engines import ClickInferer, ClickLoopInferer, ClickLoopOutput, EmbeddingCache, PerClickLoss
from msam_components.networks import build_msam

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default


def two_lesions(size: int = 24) -> torch.Tensor:
    """A [1, 1, D, H, W] label with a large cube lesion (A) and a small one (B)."""
    label = torch.zeros(1, 1, size, size, size)
    label[0, 0, 2:12, 2:12, 2:12] = 1  # A: 1000 voxels
    label[0, 0, 16:21, 16:21, 16:21] = 1  # B: 125 voxels
    return label


def test_interior_click_is_deep_inside_the_largest_error_region() -> None:
    label = two_lesions()[0]
    rng = np.random.RandomState(0)
    depths = []
    for _ in range(20):
        click = sample_click(None, label, rng, "interior")
        d, h, w = click.point.tolist()
        assert click.label == 1 and 2 <= d < 12 and 2 <= h < 12 and 2 <= w < 12  # always in A, the larger lesion
        depths.append(min(d - 2, 11 - d, h - 2, 11 - h, w - 2, 11 - w) + 1)
    assert min(depths) >= 3  # inner half: at least half of A's maximal depth (5)
    assert (
        len({tuple(sample_click(None, label, np.random.RandomState(s), "interior").point.tolist()) for s in range(8)})
        > 1
    )
    # a prediction covering A and a large false positive: the false positive is the largest error region
    pred = torch.full_like(label, -5.0)
    pred[0, 2:12, 2:12, 2:12] = 5.0
    pred[0, 0:24, 14:24, 0:10] = 5.0
    click = sample_click(pred, label, rng, "interior")
    assert click.label == 0 and label[0][tuple(click.point.tolist())] == 0
    with pytest.raises(TypeError, match="interior"):
        sample_click(None, label, None, "interior")


def test_strategy_mixtures_are_validated_and_drawn() -> None:
    assert check_strategy("s", "center") == {"center": 1.0}
    assert check_strategy("s", {"random": 1, "interior": 3}) == {"random": 1.0, "interior": 3.0}
    for bad in ("edge", {"edge": 1.0}, {"random": 0.0}, {}, 3):
        with pytest.raises(ValueError, match="s"):
            check_strategy("s", bad)
    sim = ClickSimulator(two_lesions(), np.random.RandomState(0), strategy={"random": 1.0, "center": 1.0})
    drawn = {sim._draw_strategy(sim.strategy) for _ in range(50)}
    assert drawn == {"random", "center"}


def test_clicked_target_follows_positive_clicks() -> None:
    label = two_lesions()
    lesion_a = torch.zeros_like(label)
    lesion_a[0, 0, 2:12, 2:12, 2:12] = 1
    sim = ClickSimulator(label, np.random.RandomState(0), strategy="center", target="clicked")
    sim(0, None)  # center: deepest voxel of the whole lesion mask, in A
    assert torch.equal(sim.target(0), lesion_a)
    pred = torch.where(lesion_a > 0, 5.0, -5.0)
    points, labels = sim(1, pred)  # the remaining error is B: a positive click there
    assert labels.item() == 1 and torch.equal(sim.target(1), label)
    pred_fp = torch.where(label > 0, 5.0, -5.0)
    pred_fp[0, 0, 14:24, 0:10, 0:10] = 5.0
    points, labels = sim(2, pred_fp)  # a negative click in the false positive: target unchanged
    assert labels.item() == 0 and torch.equal(sim.target(2), label)
    reference = ClickSimulator(label, np.random.RandomState(0), strategy="center")
    reference(0, None)
    assert torch.equal(reference.target(0), label)  # target "all": the whole label whatever was clicked
    with pytest.raises(ValueError, match="target"):
        ClickSimulator(label, np.random.RandomState(0), target="some")


def test_starting_mask_and_feedback_dropout() -> None:
    label = two_lesions(32)
    sim = ClickSimulator(label, np.random.RandomState(3), initial_mask_prob=1.0, target="clicked")
    zeros = torch.zeros(1, 1, 8, 8, 8)
    fed = sim.feedback(0, zeros)
    assert fed is not zeros and fed.abs().min() >= 2.0 - 1e-5  # every voxel +-[2, 8]: a confident mask
    assert torch.equal(sim.feedback(1, zeros), zeros)  # no dropout configured: unchanged, same object
    for seed in range(20):  # lesions in the starting mask (A is large enough to show at low resolution) join the target
        sim = ClickSimulator(label, np.random.RandomState(seed), initial_mask_prob=1.0, target="clicked")
        fed = sim.feedback(0, zeros)
        assert not bool(sim._selected[0, 1]) or bool((fed > 0).any())
        sim(0, sim_full(fed))
        kept = sim._kept_fp[0]
        extra = sim.target(0) > label  # only a starting-mask false positive is a target outside the label
        assert torch.equal(extra[0, 0], kept if kept is not None else torch.zeros_like(extra[0, 0]))
        if kept is not None:  # a negative click in it removes it from the target
            inside = torch.nonzero(kept)[0]
            sim._select(inside.view(1, 1, 3), torch.tensor([[0]]))
            assert not (sim._current_target() > label).any()
        if sim._selected[0, 1]:
            assert sim.target(0)[0, 0, 2:12, 2:12, 2:12].all()
    components = torch.zeros(32, 32, 32, dtype=torch.int64).numpy()
    components[2:12, 2:12, 2:12] = 1
    moved = [ClickSimulator(label, np.random.RandomState(s))._displaced_lesion(components) for s in range(10)]
    assert any(m.sum() == 1000 for m in moved)  # a whole copy of the lesion...
    assert not any((m & (components > 0)).any() for m in moved)  # ...never on a lesion
    dropper = ClickSimulator(label, np.random.RandomState(0), feedback_dropout=1.0)
    ones = torch.ones(1, 1, 8, 8, 8)
    assert torch.equal(dropper.feedback(0, ones), ones)  # the first mask is never dropped
    assert torch.equal(dropper.feedback(1, ones), torch.zeros_like(ones))


def sim_full(low_res: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling of 8^3 low-res logits to the 32^3 label grid of these tests."""
    return low_res.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)


def test_refine_draws_the_click_from_the_replaced_mask() -> None:
    torch.manual_seed(0)
    model = build_msam(**small_msam_kwargs()).eval()
    image = torch.randn(1, 1, 64, 64, 64)
    seen = []

    def click_fn(i, logits):
        seen.append(logits)
        return torch.tensor([[[32, 32, 32]]]), torch.tensor([[1]])

    def feedback_fn(i, low_res):
        return torch.full_like(low_res, 3.0) if i == 0 else low_res

    with torch.no_grad():
        out = model(image, click_fn=click_fn, num_clicks=2, feedback_fn=feedback_fn)
    assert out.shape == (1, 2, 64, 64, 64)
    assert torch.allclose(seen[0], torch.full((1, 1, 64, 64, 64), 3.0))  # click 1 sees the starting mask
    assert torch.equal(seen[1], out[:, :1])


def test_click_compliance_per_click() -> None:
    logits = torch.full((2, 3, 4, 4, 4), -1.0)
    logits[0, 0, 1, 1, 1] = 2.0  # case 0, click 0: positive click at (1,1,1) obeyed
    logits[1, 1, 2, 2, 2] = 2.0  # case 1, click 1: negative click at (2,2,2) not obeyed
    points = torch.tensor([[[1, 1, 1], [0, 0, 0], [3, 3, 3]], [[1, 1, 1], [2, 2, 2], [0, 0, 0]]])
    labels = torch.tensor([[1, -1, 0], [1, 0, 0]])
    comp = click_compliance(logits, points, labels, lambda x: x > 0.5)
    assert comp[0, 0] == 1 and math.isnan(comp[0, 1]) and comp[0, 2] == 1
    assert comp[1, 0] == 0 and comp[1, 1] == 0 and comp[1, 2] == 1


def test_cumulative_inference_gives_every_click_so_far() -> None:
    torch.manual_seed(0)
    model = build_msam(**small_msam_kwargs()).eval()
    image = torch.randn(1, 1, 64, 64, 64)
    fg, bg = [[30, 30, 30], [10, 40, 20]], [[50, 12, 33]]
    with torch.no_grad():
        state = model.prepare_embedding(model.encode(image))
        points = torch.tensor([fg + bg])
        labels = torch.tensor([[1, 1, 0]])
        low = torch.zeros(1, 1, *model.low_res_size)
        for i in range(3):
            low = model.decode(state, points[:, : i + 1], labels[:, : i + 1], low)
        expected = model.upsample(low)
        inferer = ClickInferer(mode="cumulative", cache=EmbeddingCache())
        got = inferer(image, model, foreground=fg[:1], background=[])
        got = inferer(image, model, foreground=fg, background=bg)  # resumes after the cached first click
        assert inferer.last_decode_steps == 2
        sequential = ClickInferer(mode="sequential")(image, model, foreground=fg, background=bg)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(sequential, expected, atol=1e-4)
    with pytest.raises(ValueError, match="cumulative"):
        ClickInferer(mode="all")


def test_point_loss_and_click_weighting_change_the_loss() -> None:
    with pytest.raises(ValueError, match="loss_click_weighting"):
        PerClickLoss(weighting="late")
    with pytest.raises(ValueError, match="lambda_click"):
        PerClickLoss(lambda_click=-1.0)
    with pytest.raises(ValueError, match="initial_mask_prob"):
        ClickLoopInferer(initial_mask_prob=1.5)

    def loss_function(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(logits) - target).abs().mean()

    label = two_lesions()
    sim = ClickSimulator(label, np.random.RandomState(0), strategy="center")
    logits = torch.full((1, 2, 24, 24, 24), -3.0, requires_grad=True)
    sim(0, None)
    sim(1, logits[:, :1].detach())
    output = ClickLoopOutput(logits, sim)
    plain = PerClickLoss(loss_function)(output, label)
    with_points = PerClickLoss(loss_function, lambda_click=1.0)(output, label)
    linear = PerClickLoss(loss_function, weighting="linear")(output, label)
    per_click = [loss_function(logits[:, k : k + 1], label) for k in range(2)]
    assert torch.allclose(plain, per_click[0] + per_click[1])
    assert torch.allclose(linear, 2 / 3 * per_click[0] + 4 / 3 * per_click[1])
    # both clicks are positive and their voxels predicted background: the point loss is softplus(3.5) per click
    assert torch.allclose(with_points - plain, torch.tensor(2 * math.log1p(math.exp(3.5))), atol=1e-5)


def test_click_stamp_writes_clicks_into_the_mask_prompt() -> None:
    from msam_components.networks.click_prompt import stamp_clicks

    prompt = torch.full((1, 1, 16, 16, 16), -3.0)
    points = torch.tensor([[[34, 34, 34], [0, 0, 0], [6, 6, 6]]])  # low-res voxel 8's centre is input voxel 33.5
    out = stamp_clicks(prompt, points, torch.tensor([[1, -1, 0]]), 64, 8.0, 1.0)
    g = math.exp(-3 * (0.5 / 4) ** 2 / 2)  # Gaussian weight 1/8 low-res voxel from the centre on each axis
    assert torch.isclose(out[0, 0, 8, 8, 8], torch.tensor(8.0 * g - 3.0 * (1 - g)))  # mostly replaced by the stamp
    assert out[0, 0, 1, 1, 1] < -7.0  # the negative click
    assert torch.isclose(out[0, 0, 15, 0, 15], torch.tensor(-3.0), atol=1e-4)  # far from every click: unchanged
    assert not torch.isnan(out).any()
    ignored = stamp_clicks(prompt, points[:, :2], torch.tensor([[-1, -1]]), 64, 8.0, 1.0)
    assert torch.equal(ignored, prompt)  # padding clicks write nothing
    torch.manual_seed(0)
    plain = build_msam(**small_msam_kwargs()).eval()
    stamped = build_msam(**small_msam_kwargs(click_stamp=8.0)).eval()
    stamped.load_state_dict(plain.state_dict())  # parameter-free: same checkpoint
    image = torch.randn(1, 1, 64, 64, 64)
    pts, lbl = torch.tensor([[[30, 30, 30]]]), torch.tensor([[0]])
    with torch.no_grad():
        a = plain.decode(plain.encode(image), pts, lbl, None)
        b = stamped.decode(stamped.encode(image), pts, lbl, None)
        c = plain.decode(plain.encode(image), pts, lbl, stamp_clicks(torch.zeros_like(a), pts, lbl, 64, 8.0, 1.0))
    assert not torch.allclose(a, b) and torch.allclose(b, c, atol=1e-5)
    with pytest.raises(ValueError, match="click_stamp"):
        build_msam(**small_msam_kwargs(click_stamp=-1.0))


def _interior_click_whole_volume(region: np.ndarray, rng: np.random.RandomState) -> list[int]:
    """The interior draw written out on the whole zero-padded volume (the definition the cropped EDT must match)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1, constant_values=False))[1:-1, 1:-1, 1:-1]
    candidates = np.flatnonzero(dist >= 0.5 * dist.max())
    return [int(i) for i in np.unravel_index(int(candidates[int(rng.randint(len(candidates)))]), region.shape)]


def test_interior_click_on_the_bounding_box_equals_the_whole_volume() -> None:
    """The EDT on the error region's bounding box draws the same voxel from the same seed as on the whole volume."""
    gen = np.random.RandomState(3)
    for trial in range(12):
        region = ndimage.binary_opening(ndimage.gaussian_filter(gen.rand(24, 20, 28), 2.0) > 0.52)
        region[:, :, :3] = trial % 3 == 0  # some regions touch the image edge
        region = ndimage.label(region)[0] == 1  # one component: the largest error region is itself
        if not region.any():
            continue
        label = torch.from_numpy(region.astype(np.float32))[None]
        click = sample_click(None, label, np.random.RandomState(trial), "interior")
        assert click.point.tolist() == _interior_click_whole_volume(region, np.random.RandomState(trial))
