"""PasteWindowd (window bounding-box inversion) against the plain whole-volume Invertd it replaces."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, Orientationd, Spacingd

from msam_components.transforms import CropOrPadAroundClicksd, MapClicksToImaged, PasteWindowd, window_geometry
from msam_components.transforms.paste import mask_volume, zero_preserving

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

REPO = Path(__file__).resolve().parents[1]
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit, so Orientationd does not warn about its default
WINDOW = 24


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    """A rotation about z then x (degrees), for oblique affines."""
    cz, sz = math.cos(math.radians(z_deg)), math.sin(math.radians(z_deg))
    cx, sx = math.cos(math.radians(x_deg)), math.sin(math.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rx @ rz


def _affine(linear: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    """A 4x4 affine from a 3x3 matrix (columns = voxel axes in mm) and an origin."""
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


GEOMETRIES = {  # name: (affine, shape, click on disk)
    "anisotropic": (np.diag([0.75, 0.75, 2.5, 1.0]), (70, 64, 20), [35, 30, 10]),
    "lps": (_affine(np.diag([-0.7, -0.8, 2.0]), (40.0, 30.0, -12.0)), (60, 56, 18), [20, 35, 6]),
    "permuted_flipped": (
        np.array([[0.0, 0.0, -3.0, 12.3], [-0.8, 0.0, 0.0, -7.1], [0.0, 0.8, 0.0, 40.2], [0.0, 0.0, 0.0, 1.0]]),
        (48, 44, 14),
        [24, 20, 7],
    ),
    "oblique": (
        _affine(_rotation(23.0, 11.0) @ np.diag([0.9, -0.7, 2.2]), (-20.0, 15.0, 7.5)),
        (52, 60, 16),
        [26, 30, 8],
    ),
    "window_past_every_border": (np.diag([1.2, 1.4, 3.0, 1.0]), (16, 14, 6), [2, 12, 1]),
    "click_at_a_corner": (
        _affine(_rotation(-14.0, 6.0) @ np.diag([0.8, 0.8, 2.5]), (0.0, 0.0, 0.0)),
        (40, 40, 16),
        [0, 39, 15],
    ),
}


def _nifti(tmp_path: Path, name: str) -> tuple[str, list[int]]:
    """Write the named geometry as a NIfTI of smooth random intensities; return its path and the click."""
    affine, shape, click = GEOMETRIES[name]
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path), click


def _pipeline(pixdim: float = 1.5) -> Compose:
    """The inference chain of the bundles: load, reorient, resample, map the clicks, crop a window around them."""
    return Compose(
        [
            LoadImaged("image", ensure_channel_first=True),
            Orientationd("image", axcodes="RAS", labels=RAS_LABELS),
            Spacingd("image", pixdim=pixdim, mode="bilinear"),
            MapClicksToImaged(),
            CropOrPadAroundClicksd(spatial_size=WINDOW),
        ]
    )


def _ball_logits(shape: tuple[int, ...], centre: torch.Tensor, peak: float, slope: float) -> torch.Tensor:
    """``[1, *shape]`` logits falling off linearly (``slope`` per voxel) from ``peak`` at ``centre``: a ball above 0.5."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    return (peak - ((grid - centre.to(torch.float32).reshape(3, 1, 1, 1)) ** 2).sum(0).sqrt() * slope)[None]


def _with_pred(data: dict, logits: torch.Tensor) -> dict:
    """Attach window logits as "pred", carrying the image's metadata and trace as ClickInferer's output does."""
    data["pred"] = MetaTensor(logits, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    return data


def _predicted(path: str, click: list[int], pipeline: Compose) -> dict:
    """Preprocess and attach a window 'prediction': logits of a blob around the click plus noise."""
    data = pipeline({"image": path, "foreground": [click], "background": []})
    noise = 0.5 * torch.randn((1, *(WINDOW,) * 3), generator=torch.Generator().manual_seed(1))
    return _with_pred(data, _ball_logits((WINDOW,) * 3, data["foreground"][0], 4.0, 0.5) + noise)


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two boolean tensors (1 when both are empty)."""
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


def _both(data: dict, pipeline: Compose, **kwargs: object) -> tuple[MetaTensor, MetaTensor]:
    """The reference (plain Invertd on the whole volume) and the bounding-box result for the same prediction."""
    reference = PasteWindowd("pred", pipeline, full_inversion=True, **kwargs)(dict(data))["pred"]
    fast = PasteWindowd("pred", pipeline, **kwargs)(dict(data))["pred"]
    return reference, fast


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_bbox_inversion_equals_full_invertd(tmp_path: Path, name: str) -> None:
    """Same shape, affine and values as Invertd; in its recorded float64 the masks are identical."""
    path, click = _nifti(tmp_path, name)
    pipeline = _pipeline()
    data = _predicted(path, click, pipeline)
    assert window_geometry(data["image"]) is not None, "the bundle chain must take the fast path"
    source = nib.load(path)
    reference, exact = _both(data, pipeline, dtype=None)
    fast = PasteWindowd("pred", pipeline)(dict(data))["pred"]  # float32, the default
    for out in (exact, fast):
        assert out.shape == reference.shape == (1, *source.shape)
        np.testing.assert_allclose(out.affine.numpy(), source.affine, atol=1e-5)
        np.testing.assert_allclose(out.affine.numpy(), reference.affine.numpy(), atol=1e-6)
        assert out.meta["filename_or_obj"] == reference.meta["filename_or_obj"]
    assert float((exact - reference).abs().max()) < 1e-5
    assert torch.equal(exact.as_tensor() >= 0.5, reference.as_tensor() >= 0.5)
    assert float((fast - reference).abs().max()) < 1e-4
    assert _dice(fast.as_tensor() >= 0.5, reference.as_tensor() >= 0.5) >= 0.999
    assert int((reference.as_tensor() >= 0.5).sum()) > 0, "the test prediction must not be empty"


# A sample coordinate closer than this to a half-integer is a nearest-neighbour tie: grid_sample (the reference)
# normalises coordinates through float32 grids, so on a 64-voxel axis its coordinate may be off by a few 2^-24 * 64 ~ 4e-6
# voxels, and which way a tie rounds depends on the CPU's kernels. 1e-5 covers that with room; measured gaps: < 1e-7.
TIE_TOLERANCE = 1e-5


def _nearest_ties(geometry) -> torch.Tensor:
    """Input-grid voxels whose sample in the resampled grid lies half-way between two voxels along some axis."""
    to_resampled = torch.linalg.solve(geometry.resampled_affine, geometry.input_affine)
    axes = [torch.arange(n, dtype=torch.float64) for n in geometry.input_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    coords = grid @ to_resampled[:3, :3].T + to_resampled[:3, 3]
    return ((coords - coords.floor() - 0.5).abs() < TIE_TOLERANCE).any(dim=-1)


def test_bbox_inversion_nearest_interp_equals_full_invertd(tmp_path: Path) -> None:
    """Nearest-neighbour inversion equals Invertd's on every voxel that is not a tie; ties are the grids' own.

    The oblique image's axes stay parallel through reorientation and resampling, so the mapping is a rational scaling
    per axis (0.9 / 1.5 mm = 0.6): whole planes of input voxels sample exactly half-way between two resampled voxels
    (12.5 % of them here), and each implementation rounds those either way under float rounding.
    """
    path, click = _nifti(tmp_path, "oblique")
    pipeline = _pipeline()
    data = _predicted(path, click, pipeline)
    reference, fast = _both(data, pipeline, nearest_interp=True, dtype=None)
    ties = _nearest_ties(window_geometry(data["image"]))
    differs = (fast.as_tensor() != reference.as_tensor())[0]
    assert float(ties.float().mean()) < 0.2, "the test geometry should leave most voxels away from ties"
    assert int((reference.as_tensor()[0][~ties] != 0).sum()) > 1000, "the compared voxels must hold the prediction"
    assert int((differs & ~ties).sum()) == 0, f"{int((differs & ~ties).sum())} voxels differ that are not ties"


def test_bbox_inversion_resamples_only_the_box(tmp_path: Path) -> None:
    """The fast path never calls Invertd and leaves everything outside the window's box zero."""
    path, click = _nifti(tmp_path, "anisotropic")
    pipeline = _pipeline()
    data = _predicted(path, click, pipeline)
    data["pred"] = data["pred"] * 0 + 7.0  # constant: the pasted region is then the box itself
    paste = PasteWindowd("pred", pipeline)
    paste.reference = None  # any fallback to the whole-volume path would fail
    out = paste(dict(data))["pred"][0]
    nonzero = torch.nonzero(out)
    extent = (nonzero.max(0).values - nonzero.min(0).values + 1).tolist()
    # a 24^3 window at 1.5 mm spans 36 mm: 48 x 48 x 14.4 voxels of 0.75 x 0.75 x 2.5 mm, plus one voxel of blending
    assert extent[0] <= 50 and extent[1] <= 50 and extent[2] <= 17
    assert float(out.max()) == pytest.approx(7.0)


def test_box_only_then_mask_volume_equals_thresholded_full_result(tmp_path: Path) -> None:
    path, click = _nifti(tmp_path, "anisotropic")
    pipeline = _pipeline()
    data = _predicted(path, click, pipeline)
    full = PasteWindowd("pred", pipeline)(dict(data))["pred"]
    box = PasteWindowd("pred", pipeline, box_only=True)(dict(data))["pred"]
    assert box.shape[1:] != full.shape[1:]  # really a box
    mask = mask_volume((box >= 0.5).float())
    assert mask.dtype == np.uint8 and mask.flags.f_contiguous and mask.shape == full.shape[1:]
    assert np.array_equal(mask, (full[0].numpy() >= 0.5).astype(np.uint8))
    assert np.array_equal(mask_volume((full >= 0.5).float()), mask)  # a whole volume passes through


def test_other_chains_fall_back_to_invertd(tmp_path: Path) -> None:
    """Two resamplings are not one interpolation: the transform then runs Invertd itself."""
    path, click = _nifti(tmp_path, "anisotropic")
    twice = Compose([*_pipeline().transforms[:3], Spacingd("image", pixdim=2.0), *_pipeline().transforms[3:]])
    data = _predicted(path, click, twice)
    assert window_geometry(data["image"]) is None
    reference, fast = _both(data, twice)
    assert torch.equal(fast.as_tensor(), reference.as_tensor())


def test_flags_read_like_every_boolean_option() -> None:
    """A command-line "false" is False (not a truthy string); anything else that is not a boolean is refused."""
    assert PasteWindowd("pred", _pipeline(), full_inversion="false").full_inversion is False
    assert PasteWindowd("pred", _pipeline(), full_inversion="True").full_inversion is True
    with pytest.raises(TypeError, match="full_inversion"):
        PasteWindowd("pred", _pipeline(), full_inversion="fast")


def test_bundle_inference_config_takes_the_fast_path(tmp_path: Path) -> None:
    """The bundles' own preprocessing and postprocessing: bounding-box result equal to the reference."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles/msam_kits19/configs/inference.yaml")])
    pre = parser.get_parsed_content("preprocessing")
    paste = parser.get_parsed_content("postprocessing").transforms[0]
    assert isinstance(paste, PasteWindowd) and not paste.full_inversion
    affine = _affine(_rotation(8.0, -5.0) @ np.diag([0.8, 0.8, 2.5]), (-100.0, -90.0, 10.0))
    hu = np.random.default_rng(0).normal(40, 30, size=(200, 180, 50)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    data = pre({"image": str(path), "foreground": [[100, 90, 25]], "background": []})
    assert window_geometry(data["image"]) is not None
    _with_pred(data, torch.randn(1, 128, 128, 128, generator=torch.Generator().manual_seed(0)) + 0.5)
    reference = PasteWindowd("pred", pre, full_inversion=True)(dict(data))["pred"]
    fast = paste(dict(data))["pred"]
    assert fast.shape == reference.shape == (1, *hu.shape)
    np.testing.assert_allclose(fast.affine.numpy(), affine, atol=1e-5)
    assert _dice(fast.as_tensor() >= 0.5, reference.as_tensor() >= 0.5) >= 0.999


def test_zero_preserving_accepts_only_positive_thresholds() -> None:
    from monai.transforms import AsDiscreted, Lambdad

    assert zero_preserving([AsDiscreted("pred", threshold=0.5)])
    assert not zero_preserving([AsDiscreted("pred", threshold=0.0)])  # 0 >= 0 would fill the volume outside the box
    assert not zero_preserving([AsDiscreted("pred", argmax=True)])
    assert not zero_preserving([Lambdad("pred", lambda x: x + 1)])


class _BlobInferer:
    """Stands in for ClickInferer: logits of a ball around the first click (random tiny models predict nothing)."""

    def __init__(self) -> None:
        self.cache = type("Cache", (), {"misses": 0})()
        self.last_decode_steps = 1

    def __call__(
        self, image: MetaTensor, network: object, fg: torch.Tensor, bg: torch.Tensor, **window: object
    ) -> MetaTensor:
        assert window.get("initial_mask") is None and len(window["click_windows"]) == 1  # one window, no mask
        logits = _ball_logits(tuple(image.shape[2:]), fg[0, 0], 3.0, 0.5)
        return MetaTensor(logits[None], meta=image.meta, applied_operations=image.applied_operations)


def test_app_task_box_mask_equals_full_inversion_and_keeps_its_cache(tmp_path: Path) -> None:
    """The MONAI Label task (box_only paste, uint8 mask, shared cached voxels) against the whole-volume reference."""
    pytest.importorskip("monailabel")
    import sys

    sys.path.insert(0, str(REPO / "monailabel_app"))
    from lib.bundle_infer import MSAMBundleInferTask

    overlay = REPO / "tests/configs/small_bundle.yaml"
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles/msam_kits19/configs/inference.yaml"), str(overlay)])
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    affine = _affine(_rotation(9.0, 4.0) @ np.diag([0.8, 0.8, 2.5]), (-60.0, -50.0, 5.0))
    hu = np.random.default_rng(0).normal(40, 30, size=(160, 150, 50)).astype(np.int16)
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(image))
    task = MSAMBundleInferTask(REPO / "bundles/msam_kits19", tmp_path / "model.pt", [str(overlay)], device="cpu")
    parts = task._build()
    parts["inferer"] = _BlobInferer()
    paste = parts["postprocessing"].transforms[0]
    assert isinstance(paste, PasteWindowd) and paste.box_only
    masks = []
    for click, full in (([80, 70, 25], False), ([80, 70, 25], True), ([90, 60, 20], False)):
        paste.full_inversion = full
        out, _ = task({"image": str(image), "foreground": [click], "background": []})
        result = nib.load(out)
        assert result.shape == hu.shape
        np.testing.assert_allclose(result.affine, affine, atol=1e-5)
        masks.append(np.asarray(result.dataobj))
        cached = next(iter(parts["prepared_images"].values()))["image"]
        assert [op["class"] for op in cached.applied_operations] == ["Orientation", "SpatialResample"]
    fast, reference, moved = (torch.as_tensor(m > 0) for m in masks)
    assert int(reference.sum()) > 0 and _dice(fast, reference) >= 0.999
    assert not torch.equal(fast, moved)  # the third click really ran on the (unchanged) cached image


@pytest.mark.parametrize(
    "image", ["sts_ct/STS_001/CT_image.nii.gz", "brats_sample/BraTS2015_pat0001/BraTS2015_pat0001_flair.nii.gz"]
)
def test_bbox_inversion_on_real_scans(data_dir: Path, image: str) -> None:
    """Real headers (a CT and an MR): the bundle's fast path gives the reference's mask in the scan's geometry."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles/msam_kits19/configs/inference.yaml")])
    pre = parser.get_parsed_content("preprocessing")
    source = nib.load(str(data_dir / image))
    click = [s // 2 for s in source.shape[:3]]
    data = pre({"image": str(data_dir / image), "foreground": [click], "background": []})
    _with_pred(data, _ball_logits(tuple(data["image"].shape[1:]), data["foreground"][0], 3.0, 0.25))  # radius 10
    reference, fast = _both(data, pre)
    assert fast.shape[1:] == reference.shape[1:] == source.shape[:3]
    np.testing.assert_allclose(fast.affine.numpy(), source.affine, atol=1e-4)
    assert int((reference >= 0.5).sum()) > 0
    assert _dice(fast.as_tensor() >= 0.5, reference.as_tensor() >= 0.5) >= 0.999
