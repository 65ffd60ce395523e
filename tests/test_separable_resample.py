"""resample_separable and SeparableSpacingd against MONAI's SpatialResample and Spacingd they stand in for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd, SpatialResample
from test_bbox_inversion import GEOMETRIES, RAS_LABELS, _nifti, _rotation

from msam_components.transforms import SeparableSpacingd
from msam_components.transforms.resample import resample_separable

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resample_separable_equals_spatial_resample(mode: str, padding_mode: str) -> None:
    """The three 1-D passes reproduce MONAI's SpatialResample on aligned grids (flips, permutation, offsets)."""
    values = torch.randn(2, 9, 7, 5, generator=torch.Generator().manual_seed(0))
    src = torch.tensor([[0.0, 0, -2.0, 3], [1.5, 0, 0, -1], [0, -1.1, 0, 2], [0, 0, 0, 1]], dtype=torch.float64)
    dst = torch.tensor([[0.7, 0, 0, -9.3], [0, 0.6, 0, -1.9], [0, 0, -0.9, 7.7], [0, 0, 0, 1]], dtype=torch.float64)
    size = (16, 20, 19)  # reaches past the source on every side
    kwargs = {"mode": mode, "padding_mode": padding_mode, "align_corners": False, "dtype": torch.float64}
    ours = resample_separable(values, src, dst, size, **kwargs)
    theirs = SpatialResample(**kwargs)(MetaTensor(values, affine=src), dst_affine=dst, spatial_size=size)
    assert ours is not None and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.as_tensor(), atol=1e-5, rtol=0)
    oblique = dst.clone()
    oblique[:3, :3] = torch.as_tensor(_rotation(10.0, 0.0)) @ oblique[:3, :3]
    assert resample_separable(values, src, oblique, size, **kwargs) is None


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_separable_spacingd_equals_spacingd_and_inverts(tmp_path: Path, name: str) -> None:
    """Same voxels (float32 rounding), affine, shape and trace as Spacingd; Invertd restores the input grid."""
    path, _ = _nifti(tmp_path, name)
    results = []
    for spacing in (Spacingd, SeparableSpacingd):
        load = [LoadImaged("image", ensure_channel_first=True), Orientationd("image", axcodes="RAS", labels=RAS_LABELS)]
        pipeline = Compose([*load, spacing("image", pixdim=1.5, mode="bilinear")])
        out = pipeline({"image": path})
        restored = Invertd("image", pipeline, orig_keys="image")(dict(out))["image"]
        results.append((out["image"], restored))
    (reference, reference_back), (ours, ours_back) = results
    assert ours.shape == reference.shape and not ours.pending_operations
    torch.testing.assert_close(ours.affine, reference.affine)
    torch.testing.assert_close(ours.as_tensor(), reference.as_tensor(), atol=1e-4, rtol=0)
    assert [op["class"] for op in ours.applied_operations] == [op["class"] for op in reference.applied_operations]
    assert ours.applied_operations[-1]["extra_info"].keys() == reference.applied_operations[-1]["extra_info"].keys()
    assert ours_back.shape == reference_back.shape
    torch.testing.assert_close(ours_back.affine, reference_back.affine)
    torch.testing.assert_close(ours_back.as_tensor(), reference_back.as_tensor(), atol=1e-4, rtol=0)


def test_separable_spacingd_does_not_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an oblique CT (float32 affine) the resampling runs in resample_separable, never in MONAI's apply_pending."""
    import msam_components.transforms.resample as module

    calls = []
    original = module.resample_separable
    monkeypatch.setattr(module, "apply_pending", lambda *a, **k: pytest.fail("fell back to apply_pending"))
    monkeypatch.setattr(module, "resample_separable", lambda *a, **k: calls.append(1) or original(*a, **k))
    path, _ = _nifti(tmp_path, "oblique")
    load = [LoadImaged("image", ensure_channel_first=True), Orientationd("image", axcodes="RAS", labels=RAS_LABELS)]
    Compose([*load, SeparableSpacingd("image", pixdim=1.5)])({"image": path})
    assert calls == [1]
