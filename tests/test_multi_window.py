"""Clicks on several lesions far apart (issue 13 item 2): one model window per group of clicks, merged into one mask.

Checks the grouping, the crop box and window bookkeeping of ``CropOrPadAroundClicksd(multi_window=True)``, that
``ClickInferer`` gives each window exactly what running it alone would give, and that the bundle's inference writes a
mask in the input geometry (RAS, LPS, permuted) where one window used to refuse the clicks.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import input_geometries, small_msam_kwargs
from monai.bundle import ConfigWorkflow

from msam_components.engines import ClickInferer
from msam_components.engines.click_inferer import OUTSIDE_LOGIT
from msam_components.networks import MSAM, build_msam
from msam_components.transforms import CropOrPadAroundClicksd
from msam_components.transforms.spatial import group_clicks

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msam_kits19"
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"


def test_group_clicks_keeps_each_group_within_one_window_with_margin() -> None:
    points = torch.tensor([[10, 10, 10], [90, 10, 10], [40, 40, 40], [200, 5, 5], [150, 10, 10]])
    groups = group_clicks(points, (128,) * 3, (16,) * 3)
    assert groups.tolist() == [0, 0, 0, 1, 1]
    for g in groups.unique():
        pts = points[groups == g]
        assert bool(((pts.max(0).values - pts.min(0).values) <= 95).all())
    with pytest.raises(ValueError, match="margin"):
        group_clicks(points, (16,) * 3, (8,) * 3)


def test_crop_holds_one_window_per_group_and_shifts_the_clicks() -> None:
    image = torch.arange(200 * 40 * 30, dtype=torch.float32).reshape(1, 200, 40, 30)
    t = CropOrPadAroundClicksd(keys="image", spatial_size=32, center="first", multi_window=True)
    out = t({"image": image, "foreground": [[20, 20, 15], [180, 20, 15], [25, 22, 14]], "background": [[178, 19, 15]]})
    windows, groups = out["click_windows"], out["click_groups"]
    assert groups.tolist() == [0, 1, 0] and windows.shape == (2, 3)
    box = out["image"]
    for g, start in enumerate(windows.tolist()):
        for click in out["foreground"][groups == g].tolist():
            assert all(s <= c < s + 32 for c, s in zip(click, start))  # each click lies in its group's window
    # the crop is the image under the box: a click's voxel value is the image's at the click
    for original, shifted in zip([[20, 20, 15], [180, 20, 15]], out["foreground"][:2].tolist()):
        assert float(box[(0, *shifted)]) == float(image[(0, *original)])
    near = t({"image": image, "foreground": [[20, 20, 15], [30, 20, 15]], "background": []})
    assert near["image"].shape[1:] == (32, 32, 32) and near["click_windows"].tolist() == [[0, 0, 0]]


@pytest.fixture(scope="module")
def tiny() -> MSAM:
    torch.manual_seed(0)
    return build_msam(**small_msam_kwargs(image_size=32, patch_size=4, click_stamp=4.0)).eval()


def test_each_window_gets_what_running_it_alone_gives(tiny: MSAM) -> None:
    torch.manual_seed(2)
    box = torch.randn(1, 1, 70, 40, 32)
    windows = torch.tensor([[0, 0, 0], [38, 8, 0]])
    fg = torch.tensor([[[10, 12, 16], [60, 20, 16], [14, 10, 16]]])
    groups = torch.tensor([[0, 1, 0]])
    bg = torch.tensor([[[50, 20, 16], [5, 5, 5]]])  # one in each window (the first also inside window 0? no: x=50)
    inferer = ClickInferer(mode="cumulative")
    with torch.no_grad():
        merged = inferer(box, tiny, fg, bg, click_windows=windows, click_groups=groups)
        assert merged.shape == (1, 1, 70, 40, 32)
        alone = ClickInferer(mode="cumulative")
        first = alone(box[..., 0:32, 0:32, 0:32], tiny, [[10, 12, 16], [14, 10, 16]], [[5, 5, 5]])
        second = alone(box[..., 38:70, 8:40, 0:32], tiny, [[22, 12, 16]], [[12, 12, 16]])
    expected = torch.full_like(merged, OUTSIDE_LOGIT)
    expected[..., 0:32, 0:32, 0:32] = first
    expected[..., 38:70, 8:40, 0:32] = torch.maximum(expected[..., 38:70, 8:40, 0:32], second)
    torch.testing.assert_close(merged, expected)
    assert float(merged[0, 0, 35, 0, 0]) == OUTSIDE_LOGIT  # no window reaches there
    with pytest.raises(ValueError, match="do not lie inside"):
        inferer(box, tiny, fg, bg, click_windows=torch.tensor([[0, 0, 0], [60, 0, 0]]), click_groups=groups)


# ---- through the bundle's inference.yaml ---------------------------------------------------------------------------


GEOMETRIES = input_geometries()


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_far_apart_tumours_are_segmented_in_the_input_geometry(
    geometry: str, small_bundle_checkpoint: Path, tmp_path: Path
):
    """Two tumours 200 mm apart (the small test model's window is 96 mm): both clicks are used, each in its window."""
    shape = (160, 40, 24)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centres = [np.array([20, 20, 12]), np.array([140, 20, 12])]
    tumours = [((grid - c.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 16 for c in centres]
    image = np.where(tumours[0] | tumours[1], 90, 30).astype(np.int16)
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(image, GEOMETRIES[geometry]), str(path))
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / "inference.yaml"), str(SMALL)],
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        image_path=str(path),
        foreground=[c.tolist() for c in centres],
        background=[],
        ckpt_path=str(small_bundle_checkpoint),
        output_dir=str(tmp_path / "out"),
    )
    wf.initialize()
    item = wf.dataset[0]
    assert item["click_windows"].shape == (2, 3) and item["click_groups"].tolist() == [0, 1]
    for click, start in zip(item["foreground"].tolist(), item["click_windows"].tolist()):
        assert all(s <= c < s + 32 for c, s in zip(click, start))
        assert float(item["image"][(0, *click)]) > 0  # the click lands on the tumour in the (normalised) crop
    wf.run()
    wf.finalize()
    written = list((tmp_path / "out").glob("*_seg.nii.gz"))
    assert len(written) == 1
    result = nib.load(str(written[0]))
    assert result.shape == shape
    np.testing.assert_allclose(result.affine, GEOMETRIES[geometry], atol=1e-5)


def test_click_instances_number_the_clicked_lesions_in_click_order() -> None:
    from msam_components.transforms import ClickInstancesd, click_instances

    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[2:5, 2:5, 2:5] = 1  # clicked second
    mask[10:14, 10:14, 10:14] = 1  # clicked first (twice)
    mask[16:18, 2:4, 2:4] = 1  # never clicked
    values = click_instances(mask, np.array([[11, 11, 11], [3, 3, 3], [12, 12, 12], [0, 19, 0]]))
    assert values[11, 11, 11] == 1 and values[3, 3, 3] == 2 and values[17, 3, 3] == 3
    assert set(np.unique(values).tolist()) == {0, 1, 2, 3} and ((values > 0) == (mask > 0)).all()
    out = ClickInstancesd(keys="pred", clicks=[[3, 3, 3]])({"pred": torch.as_tensor(mask[None])})["pred"]
    assert out[0, 3, 3, 3] == 1 and out[0, 11, 11, 11] == 2
    off = ClickInstancesd(keys="pred", clicks=[[3, 3, 3]], enabled=False)({"pred": torch.as_tensor(mask[None])})["pred"]
    assert torch.equal(off, torch.as_tensor(mask[None]))
    with pytest.raises(ValueError, match="outside the mask"):
        click_instances(mask, np.array([[25, 0, 0]]))


def test_bundle_inference_writes_one_value_per_clicked_lesion(small_bundle_checkpoint: Path, tmp_path: Path) -> None:
    """--instances true: one value per clicked object, in click order. The random tiny model predicts nothing, so the
    threshold is put between the windows' logits and the logit where no window reaches: the mask is then exactly the
    two windows (two objects; the union box covers this image, so nothing is zero-filled), which also checks where
    the windows land in the input geometry."""
    shape = (160, 40, 24)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centres = [[20, 20, 12], [140, 20, 12]]
    image = np.where(sum(((grid - np.reshape(c, (3, 1, 1, 1))) ** 2).sum(0) <= 16 for c in centres) > 0, 90, 30)
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), GEOMETRIES["ras"]), str(path))
    results = {}
    for instances in (False, True):
        out = tmp_path / f"out_{instances}"
        wf = ConfigWorkflow(
            config_file=[str(BUNDLE / "configs" / "inference.yaml"), str(SMALL)],
            workflow_type="infer",
            bundle_root=str(BUNDLE),
            image_path=str(path),
            foreground=centres,
            background=[],
            ckpt_path=str(small_bundle_checkpoint),
            output_dir=str(out),
            instances=instances,
            pred_threshold=OUTSIDE_LOGIT / 2,
        )
        wf.initialize()
        wf.run()
        wf.finalize()
        results[instances] = np.asarray(nib.load(str(next(out.glob("*_seg.nii.gz")))).dataobj)
    from msam_components.transforms import click_instances

    np.testing.assert_array_equal(results[True], click_instances(results[False], np.array(centres)))
    from scipy import ndimage

    assert ndimage.label(results[False])[1] == 2  # one object per window: the windows did not merge
    assert results[True][tuple(centres[0])] == 1 and results[True][tuple(centres[1])] == 2
    assert results[True][80, 20, 12] == 0  # between the windows


def test_grow_windows_widens_the_crop_and_keeps_the_input_geometry(
    small_bundle_checkpoint: Path, tmp_path: Path
) -> None:
    """--grow_windows 2 on a lesion longer than the test model's 96 mm window (the growth itself: test_grow_windows)."""
    shape = (160, 40, 24)
    image = np.full(shape, 30, dtype=np.int16)
    image[10:150, 15:25, 8:16] = 90  # 210 mm long
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(image, GEOMETRIES["lps"]), str(path))
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / "inference.yaml"), str(SMALL)],
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        image_path=str(path),
        foreground=[[20, 20, 12]],
        background=[],
        ckpt_path=str(small_bundle_checkpoint),
        output_dir=str(tmp_path / "out"),
        grow_windows=2,
    )
    wf.initialize()
    assert wf.parser.get_parsed_content("inferer").max_grow_windows == 2
    item = wf.dataset[0]
    assert item["image"].shape[1] == 32 + 32  # one window plus 2 half-windows on the side where the image goes on
    wf.run()
    wf.finalize()
    result = nib.load(str(next((tmp_path / "out").glob("*_seg.nii.gz"))))
    assert result.shape == shape
    np.testing.assert_allclose(result.affine, GEOMETRIES["lps"], atol=1e-5)


def test_overlapping_windows_merge_by_maximum(tiny: MSAM) -> None:
    """Where two windows overlap, the merged logits are the larger of the two windows' logits."""
    torch.manual_seed(3)
    box = torch.randn(1, 1, 48, 32, 32)
    fg, groups = torch.tensor([[[8, 16, 16], [40, 16, 16]]]), torch.tensor([[0, 1]])
    with torch.no_grad():
        merged = ClickInferer(mode="cumulative")(
            box, tiny, fg, None, click_windows=torch.tensor([[0, 0, 0], [16, 0, 0]]), click_groups=groups
        )
        a = ClickInferer(mode="cumulative")(box[..., 0:32, :, :], tiny, [[8, 16, 16]], None)
        b = ClickInferer(mode="cumulative")(box[..., 16:48, :, :], tiny, [[24, 16, 16]], None)
    torch.testing.assert_close(merged[..., 0:16, :, :], a[..., 0:16, :, :])
    torch.testing.assert_close(merged[..., 16:32, :, :], torch.maximum(a[..., 16:32, :, :], b[..., 0:16, :, :]))
    torch.testing.assert_close(merged[..., 32:48, :, :], b[..., 16:32, :, :])
