"""Lesions larger than one window (issue 13 item 3): ``ClickInferer(max_grow_windows=...)`` follows a lesion out of
its window. The growth logic is checked with an oracle model that segments exactly the bright region connected to its
clicks and mask prompt, so what is tested is where windows are added, what seeds them and when growth stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from msam_components.engines import ClickInferer
from msam_components.transforms import CropOrPadAroundClicksd

S = 16


class OracleMSAM(torch.nn.Module):
    """The MSAM interface the inferer uses; decode returns +8 on the bright voxels connected to a positive click or
    to the mask prompt, -8 elsewhere."""

    image_size = S
    low_res_size = (S, S, S)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def prepare_embedding(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": embedding}

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        return low_res

    def decode(self, state, points, labels, low_res):
        bright = state["image"][0, 0].numpy() > 0
        seeds = np.zeros_like(bright)
        if low_res is not None:
            seeds |= low_res[0, 0].numpy() > 0
        if points is not None:
            for p, l in zip(points[0].tolist(), labels[0].tolist()):
                if l == 1:
                    seeds[tuple(p)] = True
        objects, _ = ndimage.label(bright)
        keep = np.isin(objects, np.unique(objects[seeds & bright])) & (objects > 0)
        return torch.where(torch.as_tensor(keep), 8.0, -8.0)[None, None]


class CopyingOracle(OracleMSAM):
    """Like a model that follows its fed-back mask: given a non-empty mask prompt it returns that mask unchanged."""

    def decode(self, state, points, labels, low_res):
        if low_res is not None and bool((low_res > 0).any()):
            return torch.where(low_res > 0, 8.0, -8.0)
        return super().decode(state, points, labels, low_res)


def _run(
    image: torch.Tensor, click: list[int], grow: int, model: torch.nn.Module | None = None
) -> tuple[torch.Tensor, ClickInferer]:
    crop = CropOrPadAroundClicksd(keys="image", spatial_size=S, center="first", multi_window=True, grow_margin=3 * S)
    data = crop({"image": image, "foreground": [click], "background": []})
    inferer = ClickInferer(mode="cumulative", max_grow_windows=grow)
    with torch.no_grad():
        logits = inferer(
            data["image"][None],
            model or OracleMSAM(),
            data["foreground"][None],
            data["background"][None],
            click_windows=data["click_windows"],
            click_groups=data["click_groups"],
        )
    return logits[0, 0] > 0, inferer


def test_a_lesion_longer_than_the_window_is_followed_to_its_end() -> None:
    image = -torch.ones(1, 64, 24, 24)
    image[0, 6:58, 8:14, 8:14] = 1.0  # a tube 52 voxels long, the window is 16
    lesion = image[0] > 0
    one, _ = _run(image, [10, 10, 10], grow=0)
    assert 0 < one.sum() < lesion.sum()  # one window: the tube is cut at the window's face
    grown, inferer = _run(image, [10, 10, 10], grow=8)
    assert torch.equal(grown, lesion) and inferer.last_grown_windows >= 4


def test_added_windows_are_decoded_from_their_click_not_from_the_mask_so_far() -> None:
    """A model that reproduces its mask prompt still follows the lesion: an added window gets no mask prompt."""
    image = -torch.ones(1, 64, 24, 24)
    image[0, 6:58, 8:14, 8:14] = 1.0
    grown, inferer = _run(image, [10, 10, 10], grow=8, model=CopyingOracle())
    assert torch.equal(grown, image[0] > 0) and inferer.last_grown_windows >= 4


def test_the_face_most_of_the_mask_crosses_is_followed_first() -> None:
    """A thin line leaving along axis 0 and a thick tube along axis 1: the single window goes to the tube (the
    faces used to be tried in axis order, which sent it along the line)."""
    image = -torch.ones(1, 40, 64, 24)
    image[0, 6:12, 2:30, 6:12] = 1.0  # thick, leaves the first window at its far face in axis 1
    image[0, 6:40, 8, 8] = 1.0  # a one-voxel line through it, leaving in axis 0
    mask, inferer = _run(image, [8, 4, 8], grow=1)
    assert inferer.last_grown_windows == 1
    assert bool(mask[6:12, 16:24, 6:12].all()) and not bool(mask[24:40, 8, 8].any())


def test_growth_stops_at_the_limit_and_at_the_image_border() -> None:
    image = -torch.ones(1, 64, 24, 24)
    image[0, 0:64, 8:14, 8:14] = 1.0  # the tube runs from border to border
    limited, inferer = _run(image, [2, 10, 10], grow=2)
    assert inferer.last_grown_windows == 2 and 0 < limited.sum() < (image[0] > 0).sum()
    full, inferer = _run(image, [2, 10, 10], grow=20)
    assert torch.equal(full, image[0] > 0)
    assert inferer.last_grown_windows < 20  # stopped because the lesion ends at the image's edges, not at the limit


def test_no_growth_for_a_lesion_inside_its_window() -> None:
    image = -torch.ones(1, 64, 24, 24)
    image[0, 20:26, 8:14, 8:14] = 1.0
    mask, inferer = _run(image, [22, 10, 10], grow=8)
    assert torch.equal(mask, image[0] > 0) and inferer.last_grown_windows == 0
    with pytest.raises(ValueError, match="max_grow_windows"):
        ClickInferer(max_grow_windows=-1)
    with pytest.raises(ValueError, match="grow_margin needs multi_window"):
        CropOrPadAroundClicksd(grow_margin=4)


class PieceOracle(OracleMSAM):
    """Like a model that segments a precise piece around its click: the bright voxels within ``radius`` voxels of a
    positive click (the demo model with ``click_stamp_sigma: 2`` does this on a long tumour)."""

    radius = 4

    def decode(self, state, points, labels, low_res):
        bright = state["image"][0, 0].numpy() > 0
        near = np.zeros_like(bright)
        grid = np.indices(bright.shape)
        for p, l in zip(points[0].tolist(), labels[0].tolist()):
            if l == 1:
                near |= sum((g - c) ** 2 for g, c in zip(grid, p)) <= self.radius**2
        return torch.where(torch.as_tensor(bright & near), 8.0, -8.0)[None, None]


def _textured(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Background -1 and noise of std 0.05, so the lesion's intensity spread (its MAD) is not zero."""
    return -torch.ones(1, *shape) + 0.05 * torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))


def _piece_run(image: torch.Tensor, click: list[int], grow: int, band: float) -> tuple[torch.Tensor, ClickInferer]:
    crop = CropOrPadAroundClicksd(keys="image", spatial_size=S, center="first", multi_window=True, grow_margin=3 * S)
    data = crop({"image": image, "foreground": [click], "background": []})
    inferer = ClickInferer(mode="cumulative", max_grow_windows=grow, grow_band=band)
    with torch.no_grad():
        logits = inferer(
            data["image"][None],
            PieceOracle(),
            data["foreground"][None],
            data["background"][None],
            click_windows=data["click_windows"],
            click_groups=data["click_groups"],
        )
    return logits[0, 0] > 0, inferer


def test_a_precise_piece_that_stays_inside_its_window_still_grows() -> None:
    """Issue 24's regression: the first click's mask is a piece that never reaches a window face, so a trigger on the
    mask itself (``grow_band=0``) adds no window; the lesion's extent from the image (``grow_band=2``) follows it."""
    image = _textured((64, 24, 24))
    image[0, 6:58, 8:14, 8:14] += 2.0  # a tube 52 voxels long (intensity 1 +- 0.05), the window is 16
    lesion = image[0] > 0
    piece, inferer = _piece_run(image, [30, 10, 10], grow=8, band=0.0)
    assert inferer.last_grown_windows == 0 and float((piece & lesion).sum() / lesion.sum()) < 0.2
    grown, inferer = _piece_run(image, [30, 10, 10], grow=8, band=2.0)
    coverage = float((grown & lesion).sum() / lesion.sum())
    assert inferer.last_grown_windows >= 2 and coverage > 0.5, (inferer.last_grown_windows, coverage)
    assert not bool((grown & ~lesion).any())  # the windows follow the tube; the model draws only on it


def test_a_small_lesion_beside_a_different_tissue_adds_no_window() -> None:
    """The extent estimate keeps to the lesion's intensity: a neighbour 0.5 brighter (ten of its robust stds) that runs
    out of the window is not followed."""
    image = _textured((64, 24, 24))
    image[0, 28:33, 8:13, 8:13] += 2.0  # the lesion, 5 voxels
    image[0, 0:64, 13:18, 8:13] += 2.5  # touching it, a long structure of another intensity
    mask, inferer = _piece_run(image, [30, 10, 10], grow=8, band=2.0)
    assert inferer.last_grown_windows == 0
    with pytest.raises(ValueError, match="grow_band"):
        ClickInferer(grow_band=-1.0)
