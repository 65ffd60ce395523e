"""Tests for the spatial transforms: crop-or-pad windows, click mapping to the preprocessed grid, and their inverses."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd

from msam_components.transforms import (
    CropOrPadAroundClicksd,
    CropOrPadAroundLabeld,
    MapClicksToImaged,
    compute_crop_or_pad_box,
    parse_clicks,
)

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit, so Orientationd does not warn about its default

# A NIfTI affine that is not diagonal: axis 0 -> -y at 0.8 mm, axis 1 -> +z at 0.8 mm, axis 2 -> -x at 3.0 mm.
SYNTH_AFFINE = np.array(
    [[0.0, 0.0, -3.0, 12.3], [-0.8, 0.0, 0.0, -7.1], [0.0, 0.8, 0.0, 40.2], [0.0, 0.0, 0.0, 1.0]], dtype=np.float64
)
SYNTH_SHAPE = (40, 24, 12)
CUBE = (slice(18, 23), slice(10, 15), slice(5, 7))  # 4 x 4 x 6 mm bright cube
CUBE_CLICK = [20, 12, 5]


def _volume(shape: tuple[int, ...], lesion: tuple[slice, ...] | None = None) -> dict[str, MetaTensor]:
    """Channel-first image whose voxel values encode their index (so crops are checkable) and a box-shaped label."""
    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape) + 1
    label = torch.zeros((1, *shape), dtype=torch.float32)
    if lesion is not None:
        label[(slice(None), *lesion)] = 1
    affine = torch.diag(torch.tensor([0.7, 1.1, 2.0, 1.0], dtype=torch.float64))
    return {"image": MetaTensor(image, affine=affine), "label": MetaTensor(label, affine=affine.clone())}


def _bbox_center(mask: torch.Tensor) -> np.ndarray:
    """Centre of the bounding box of a (spatial) boolean mask."""
    idx = np.argwhere(np.asarray(mask))
    return (idx.min(0) + idx.max(0)) / 2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays."""
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# ---------------------------------------------------------------------------------------------------- the helper


@pytest.mark.parametrize(
    "shape, center, roi",
    [
        ((200, 200, 200), (100, 100, 100), (128, 128, 128)),  # bigger
        ((50, 60, 70), (20, 30, 40), (128, 128, 128)),  # smaller
        ((200, 60, 129), (5, 59, 128), (128, 128, 128)),  # mixed, clicks at borders
        ((7, 9, 11), (3.5, 0, 10), (4, 9, 13)),  # odd sizes, half-voxel centre
    ],
)
def test_box_invariants(shape: tuple[int, ...], center: tuple[float, ...], roi: tuple[int, ...]) -> None:
    box = compute_crop_or_pad_box(shape, center, roi)
    for s, r, ws, cs, ce, pb, pa in zip(
        shape, roi, box.window_start, box.crop_start, box.crop_end, box.pad_before, box.pad_after
    ):
        assert 0 <= cs < ce <= s and pb >= 0 and pa >= 0
        assert (ce - cs) + pb + pa == r
        assert cs - pb == ws
        if s >= r:  # pure crop, fully inside the image
            assert pb == pa == 0 and ce - cs == r
        else:  # pure padding, the whole image kept
            assert (cs, ce) == (0, s)


def test_box_centres_when_not_clipped_and_clips_at_borders() -> None:
    box = compute_crop_or_pad_box((300, 300, 300), (100, 150.5, 200), (128, 128, 128))
    centre_in_window = np.array([100, 150.5, 200]) - np.array(box.window_start)
    assert np.all(np.abs(centre_in_window - 63.5) <= 1)
    assert box.to_window(torch.tensor([[100, 150, 200]])).tolist() == [[64, 63, 64]]  # 150.5 sits at 63.5
    edge = compute_crop_or_pad_box((300, 300, 300), (2, 299, 150), (128, 128, 128))
    assert edge.crop_start == (0, 172, 86) and edge.crop_end == (128, 300, 214)
    assert edge.pad_before == edge.pad_after == (0, 0, 0)
    small = compute_crop_or_pad_box((10, 10, 10), (0, 9, 5), (16, 16, 16))
    assert small.crop_start == (0, 0, 0) and small.crop_end == (10, 10, 10)
    assert small.pad_before == (6, 0, 3) and small.pad_after == (0, 6, 3)


def test_box_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ValueError, match="same length"):
        compute_crop_or_pad_box((10, 10), (5, 5, 5), (4, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        compute_crop_or_pad_box((10, 10, 10), (5, 5, 5), (4, 0, 4))


# ---------------------------------------------------------------------------------------- CropOrPadAroundLabeld


@pytest.mark.parametrize("shape", [(150, 140, 130), (40, 50, 30), (150, 40, 129)])
def test_crop_around_label_output_shape_default_128(shape: tuple[int, ...]) -> None:
    lesion = tuple(slice(s // 3, s // 3 + 5) for s in shape)
    out = CropOrPadAroundLabeld(keys=("image", "label"))(_volume(shape, lesion))
    assert out["image"].shape == out["label"].shape == (1, 128, 128, 128)
    assert int(out["label"].sum()) == 125  # the lesion is kept whole
    assert isinstance(out["image"], MetaTensor)


def test_crop_around_label_centres_lesion_and_keeps_voxels() -> None:
    shape, roi = (100, 90, 120), (24, 32, 16)
    lesion = (slice(40, 51), slice(30, 37), slice(60, 70))
    data = _volume(shape, lesion)
    out = CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=roi)(data)
    assert out["label"].shape[1:] == roi
    assert np.allclose(_bbox_center(out["label"][0] > 0), (np.array(roi) - 1) / 2, atol=1.0)
    # the image window is the same crop as the label's, voxel for voxel
    start = np.argwhere(np.asarray(out["label"][0]) > 0).min(0) - np.array([s.start for s in lesion])
    expected = data["image"][(slice(None), *(slice(-a, -a + r) for a, r in zip(start, roi)))]
    assert torch.equal(out["image"].as_tensor(), expected.as_tensor())


def test_crop_around_label_clips_at_border_keeping_lesion() -> None:
    shape, roi = (100, 100, 100), (32, 32, 32)
    lesion = (slice(0, 10), slice(90, 100), slice(45, 55))
    out = CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=roi)(_volume(shape, lesion))
    assert int(out["label"].sum()) == 1000
    assert out["image"][0, 0, 0, 0] == 1 + 0 * 10000 + 68 * 100 + 34  # window starts at (0, 68, 34), no padding


def test_crop_around_label_pads_small_image_and_mode_per_key() -> None:
    shape, roi = (10, 40, 6), (16, 16, 16)
    lesion = (slice(2, 5), slice(20, 24), slice(1, 3))
    t = CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=roi, mode=("replicate", "constant"))
    out = t(_volume(shape, lesion))
    assert out["image"].shape[1:] == out["label"].shape[1:] == roi
    assert int(out["label"].sum()) == 3 * 4 * 2
    assert float(out["image"].min()) >= 1  # replicate padding: no zeros in the image
    assert float((out["label"] == 0).sum()) > 0 and float(out["label"][0, 0, 0, 0]) == 0


def test_crop_around_label_jitter_reproducible_and_bounded() -> None:
    shape, roi, jitter = (32, 32, 32), (12, 12, 12), 3
    lesion = (slice(15, 18),) * 3  # bbox centre 16, far enough from the borders for any jitter
    data = _volume(shape, lesion)
    first = CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=roi, jitter=jitter).set_random_state(7)
    second = CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=roi, jitter=jitter).set_random_state(7)
    offsets = set()
    for _ in range(20):
        a, b = first(data), second(data)
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        offset = _bbox_center(a["label"][0] > 0) - (np.array(roi) - 1) / 2
        assert np.all(np.abs(offset) <= jitter + 0.5)
        offsets.add(tuple(offset.tolist()))
    assert len(offsets) > 5  # really random
    still = CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=roi).set_random_state(7)
    assert len({tuple(_bbox_center(still(data)["label"][0] > 0).tolist()) for _ in range(3)}) == 1


def test_crop_around_label_empty_label_uses_image_centre() -> None:
    shape = (41, 30, 20)
    out = CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=(9, 9, 9))(_volume(shape))
    assert int(out["label"].sum()) == 0
    centre_value = 1 + 20 * 30 * 20 + 14 * 20 + 9  # image voxel (20, 14, 9) (centre 14.5, 9.5 rounds up)
    assert float(out["image"][0, 4, 4, 4]) == centre_value


def test_crop_around_label_rejects_shape_mismatch_and_missing_label() -> None:
    data = _volume((20, 20, 20), (slice(5, 8),) * 3)
    data["image"] = data["image"][:, :10]
    with pytest.raises(ValueError, match="'image' has spatial shape"):
        CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=8)(data)
    with pytest.raises(KeyError, match="'seg'"):
        CropOrPadAroundLabeld(keys=("image",), label_key="seg", spatial_size=8)(data)


@pytest.mark.parametrize("shape", [(70, 20, 45), (12, 80, 33)])
def test_crop_around_label_inverse_restores_geometry(shape: tuple[int, ...]) -> None:
    lesion = (slice(3, 9), slice(5, 12), slice(30, 33))
    data = _volume(shape, lesion)
    pipeline = Compose([CropOrPadAroundLabeld(keys=("image", "label"), spatial_size=(32, 24, 16), jitter=2)])
    pipeline.set_random_state(3)
    out = pipeline(dict(data))
    assert out["image"].shape[1:] == (32, 24, 16)
    # Invertd of a prediction made in the window
    out["pred"] = out["label"].clone()
    inverted = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert inverted.shape == data["label"].shape
    assert torch.equal(inverted.as_tensor(), data["label"].as_tensor())
    # Compose.inverse of the transformed keys themselves
    restored = pipeline.inverse({"image": out["image"], "label": out["label"]})
    assert restored["image"].shape == data["image"].shape
    assert torch.allclose(restored["image"].affine, data["image"].affine)
    kept = restored["image"].as_tensor() != 0
    assert torch.equal(restored["image"].as_tensor()[kept], data["image"].as_tensor()[kept])
    assert int(kept.sum()) == int(np.prod([min(s, r) for s, r in zip(shape, (32, 24, 16))]))
    assert torch.equal(restored["label"].as_tensor(), data["label"].as_tensor())


# ------------------------------------------------------------------------------------------ MapClicksToImaged


@pytest.fixture(scope="module")
def synthetic_nifti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NIfTI with a permuted, flipped, anisotropic affine and a bright cube at ``CUBE``."""
    data = np.zeros(SYNTH_SHAPE, dtype=np.float32)
    data[CUBE] = 100.0
    path = tmp_path_factory.mktemp("nifti") / "synthetic.nii.gz"
    nib.save(nib.Nifti1Image(data, SYNTH_AFFINE), str(path))
    return path


def _load_orient(spacing: float | None) -> list:
    transforms = [LoadImaged("image", ensure_channel_first=True), Orientationd("image", "RAS", labels=RAS_LABELS)]
    if spacing is not None:
        transforms.append(Spacingd("image", pixdim=spacing, mode="bilinear"))
    return transforms


def test_map_clicks_lands_on_marked_cube_after_orientation_and_spacing(synthetic_nifti: Path) -> None:
    pipeline = Compose(_load_orient(1.5) + [MapClicksToImaged()])
    out = pipeline({"image": str(synthetic_nifti), "foreground": [CUBE_CLICK], "background": []})
    image, click = out["image"][0], out["foreground"]
    assert click.dtype == torch.int64 and click.shape == (1, 3)
    assert out["background"].dtype == torch.int64 and out["background"].shape == (0, 3)
    assert float(image[tuple(click[0].tolist())]) > 50
    bright = np.argwhere(np.asarray(image) > 50)
    assert np.all(np.abs(bright.mean(0) - click[0].numpy()) <= 1.5)
    # the raw on-disk index would be wrong here, so this test can tell a missing mapping
    assert all(i < s for i, s in zip(CUBE_CLICK, image.shape))
    assert float(image[tuple(CUBE_CLICK)]) < 50


def test_map_clicks_exact_under_pure_reorientation(tmp_path: Path) -> None:
    data = np.arange(np.prod(SYNTH_SHAPE), dtype=np.float32).reshape(SYNTH_SHAPE)
    path = tmp_path / "arange.nii.gz"
    nib.save(nib.Nifti1Image(data, SYNTH_AFFINE), str(path))
    clicks = [[0, 0, 0], [39, 23, 11], [7, 19, 2], [39, 0, 11]]
    out = Compose(_load_orient(None) + [MapClicksToImaged()])({"image": str(path), "background": clicks})
    assert out["image"].shape[1:] != SYNTH_SHAPE  # axes really were permuted
    for disk, mapped in zip(clicks, out["background"].tolist()):
        assert float(out["image"][(0, *mapped)]) == data[tuple(disk)], (disk, mapped)
    assert out["foreground"].shape == (0, 3)


def test_map_clicks_clamps_to_current_grid(synthetic_nifti: Path) -> None:
    last = [s - 1 for s in SYNTH_SHAPE]
    out = Compose(_load_orient(1.7) + [MapClicksToImaged()])(
        {"image": str(synthetic_nifti), "foreground": [last, [0, 0, 0]]}
    )
    shape = torch.tensor(out["image"].shape[1:])
    assert torch.all(out["foreground"] >= 0) and torch.all(out["foreground"] < shape)


def test_map_clicks_same_with_pending_lazy_operations(synthetic_nifti: Path) -> None:
    clicks = [CUBE_CLICK, [39, 23, 11], [0, 5, 3]]
    results = []
    for lazy in (False, True):
        data = LoadImaged("image", ensure_channel_first=True)({"image": str(synthetic_nifti), "foreground": clicks})
        data = Orientationd("image", "RAS", labels=RAS_LABELS, lazy=lazy)(data)
        data = Spacingd("image", pixdim=1.5, lazy=lazy)(data)
        assert bool(data["image"].pending_operations) == lazy
        results.append(MapClicksToImaged()(data)["foreground"])
    assert torch.equal(results[0], results[1])


@pytest.fixture()
def loaded(synthetic_nifti: Path) -> dict:
    """The synthetic image as LoadImaged gives it (on-disk spatial shape ``SYNTH_SHAPE``)."""
    return LoadImaged("image", ensure_channel_first=True)({"image": str(synthetic_nifti)})


@pytest.mark.parametrize(
    "clicks, culprit",
    [
        ([[40, 0, 0]], r"click \[40, 0, 0\] is outside the image volume of shape \(40, 24, 12\)"),
        ([[1, 2, 3], [0, -1, 0]], r"click \[0, -1, 0\] is outside the image volume of shape \(40, 24, 12\)"),
        ([[1, 2.5, 3]], r"'foreground': click #0 \[1, 2.5, 3\] has non-integer voxel index 2.5"),
        ([[1, True, 3]], r"'foreground': click #0 \[1, True, 3\] has non-integer voxel index True"),
        ([[1, "2", 3]], r"'foreground': click #0 \[1, '2', 3\] has non-integer voxel index '2'"),
        ([[1, 2]], r"'foreground': click #0 is \[1, 2\], expected a list of 3 integer voxel indices"),
        ([1, 2, 3], r"'foreground': click #0 is 1, expected a list of 3"),
        ("[[1, 2", r"'foreground': cannot parse clicks string '\[\[1, 2' as JSON"),
        (5, r"'foreground' must be a list of \[i, j, k\] voxel indices, got int: 5"),
    ],
)
def test_map_clicks_validation_names_culprit(loaded: dict, clicks: object, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        MapClicksToImaged()({**loaded, "foreground": clicks, "background": [[1, 1, 1]]})


def test_map_clicks_accepts_json_strings_integral_floats_and_arrays(loaded: dict) -> None:
    out = MapClicksToImaged()({**loaded, "foreground": "[[1, 2, 3], [4, 5, 6]]", "background": [[7.0, 8, 9]]})
    assert out["foreground"].tolist() == [[1, 2, 3], [4, 5, 6]]  # no orientation change yet: identity mapping
    assert out["background"].tolist() == [[7, 8, 9]]
    out = MapClicksToImaged()({**loaded, "foreground": np.array([[3, 2, 1]]), "background": "[]"})
    assert out["foreground"].tolist() == [[3, 2, 1]] and out["background"].shape == (0, 3)
    assert parse_clicks(torch.tensor([[1.0, 2.0, 3.0]]), "x").dtype == torch.int64


def test_map_clicks_requires_a_click_and_geometry(loaded: dict) -> None:
    with pytest.raises(ValueError, match="no click given"):
        MapClicksToImaged()({**loaded, "foreground": [], "background": "[]"})
    with pytest.raises(ValueError, match="no click given"):
        MapClicksToImaged()(dict(loaded))
    bare = {"image": MetaTensor(torch.zeros(1, 4, 4, 4)), "foreground": [[1, 1, 1]]}
    with pytest.raises(ValueError, match=r"'image' has no meta\['spatial_shape'\]"):
        MapClicksToImaged()(bare)
    with pytest.raises(KeyError, match="'background'"):
        MapClicksToImaged(allow_missing_keys=False)({**loaded, "foreground": [[1, 1, 1]]})


# ------------------------------------------------------------------------------------- CropOrPadAroundClicksd


def test_crop_around_clicks_centres_and_shifts_clicks() -> None:
    data = _volume((90, 70, 50))
    fg, bg = [[40, 30, 20], [50, 36, 24]], [[30, 20, 10]]
    out = CropOrPadAroundClicksd(spatial_size=(48, 40, 32))({**data, "foreground": fg, "background": bg})
    assert out["image"].shape[1:] == (48, 40, 32)
    assert out["foreground"].dtype == torch.int64
    assert np.allclose(out["foreground"].double().mean(0).numpy(), (np.array([48, 40, 32]) - 1) / 2, atol=1.0)
    for key, clicks in (("foreground", fg), ("background", bg)):
        for orig, shifted in zip(clicks, out[key].tolist()):
            assert float(out["image"][(0, *shifted)]) == float(data["image"][(0, *orig)])


@pytest.mark.parametrize(
    "fg, center, expected", [([], "foreground", [30, 25, 20]), ([[40, 35, 30]], "all", [35, 30, 25])]
)
def test_crop_around_clicks_centre_fallbacks(fg: list, center: str, expected: list[int]) -> None:
    data = _volume((90, 70, 50))
    out = CropOrPadAroundClicksd(spatial_size=(33, 33, 33), center=center)(
        {**data, "foreground": fg, "background": [[30, 25, 20]]}
    )
    assert float(out["image"][0, 16, 16, 16]) == float(data["image"][(0, *expected)])


def test_crop_around_clicks_rejects_clicks_beyond_field_of_view() -> None:
    data = _volume((200, 40, 40))
    clicks = {"foreground": [[10, 20, 20]], "background": [[150, 20, 20]]}
    with pytest.raises(ValueError, match=r"span more than the 128x128x128 field of view.*\[150, 20, 20\]"):
        CropOrPadAroundClicksd()({**data, **clicks})
    with pytest.raises(ValueError, match=r"no click given"):
        CropOrPadAroundClicksd()({**data, "foreground": torch.zeros(0, 3, dtype=torch.int64)})


def test_crop_around_clicks_inverse_with_invertd() -> None:
    data = _volume((20, 150, 60))
    pipeline = Compose([CropOrPadAroundClicksd(spatial_size=(24, 24, 24))])
    out = pipeline({**data, "foreground": [[10, 140, 30]]})
    out["pred"] = out["image"].clone()
    inverted = Invertd(keys="pred", transform=pipeline, orig_keys="image")(out)["pred"]
    assert inverted.shape == data["image"].shape
    kept = inverted.as_tensor() != 0
    assert int(kept.sum()) == 20 * 24 * 24
    assert torch.equal(inverted.as_tensor()[kept], data["image"].as_tensor()[kept])
    assert torch.allclose(inverted.affine, data["image"].affine)


# ------------------------------------------------------------------------------------------------- real data


REAL_CASES = {
    "sts_ct": ("sts_ct/STS_001/CT_image.nii.gz", "sts_ct/STS_001/CT_mask.nii.gz"),
    "brats": (
        "brats_sample/BraTS2015_pat0001/BraTS2015_pat0001_flair.nii.gz",
        "brats_sample/BraTS2015_pat0001/BraTS2015_pat0001_seg.nii.gz",
    ),
}


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_real_inference_pipeline_click_and_inverse(data_dir: Path, case: str) -> None:
    image_path, mask_path = (data_dir / p for p in REAL_CASES[case])
    nii = nib.load(str(mask_path))
    mask = np.asarray(nii.dataobj) > 0
    fg = np.argwhere(mask)
    click = fg[np.argmin(((fg - fg.mean(0)) ** 2).sum(1))].tolist()  # the mask's centre-most voxel
    keys = ("image", "label")
    pipeline = Compose(
        [
            LoadImaged(keys, ensure_channel_first=True),
            Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
            Spacingd(keys, pixdim=1.5, mode=("bilinear", "nearest")),
            MapClicksToImaged(),
            CropOrPadAroundClicksd(keys=keys),
        ]
    )
    out = pipeline({"image": str(image_path), "label": str(mask_path), "foreground": [click], "background": []})
    assert out["image"].shape == out["label"].shape == (1, 128, 128, 128)
    assert float(out["label"][(0, *out["foreground"][0].tolist())]) > 0  # the click is inside the lesion

    out["pred"] = (out["label"] > 0).float()
    inverted = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert inverted.shape[1:] == nii.shape
    assert np.allclose(inverted.affine.numpy(), nii.affine, atol=1e-4)
    assert _dice(np.asarray(inverted[0]) > 0.5, mask) > 0.8


def test_window_centred_on_first_click_stays_put_when_clicks_are_added() -> None:
    """center="first": adding clicks does not move the window, so the cached image embedding stays valid."""
    from msam_components.transforms import CropOrPadAroundClicksd

    image = MetaTensor(torch.arange(60 * 50 * 40, dtype=torch.float32).reshape(1, 60, 50, 40))
    first = {"image": image, "foreground": [[30, 25, 20]], "background": []}
    more = {"image": image, "foreground": [[30, 25, 20], [36, 29, 24]], "background": [[28, 22, 19]]}
    crops = {}
    for center in ("first", "foreground"):
        t = CropOrPadAroundClicksd(keys=("image",), spatial_size=24, center=center)
        crops[center] = [t(dict(d))["image"] for d in (first, more)]
    assert torch.equal(crops["first"][0], crops["first"][1])
    assert not torch.equal(crops["foreground"][0], crops["foreground"][1])
