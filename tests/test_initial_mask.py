"""Editing an existing mask: ``ClickInferer(initial_mask=...)`` and ``inference.yaml --initial_mask`` (issue 13 item 1).

The starting mask must enter the model exactly where the click loop feeds back its own predictions (as a low-res
mask prompt), follow the image through every spatial step of the bundle's preprocessing, and be refused with the file
named when it is not on the image's grid.
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
from msam_components.networks import MSAM, build_msam
from msam_components.networks.click_prompt import mask_prompt

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msam_kits19"
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"


@pytest.fixture(scope="module")
def tiny() -> MSAM:
    torch.manual_seed(0)
    return build_msam(**small_msam_kwargs(image_size=32, patch_size=4, click_stamp=4.0)).eval()


def _ball(size: int, centre: tuple[int, int, int], radius: float) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij")).float()
    return (((grid - torch.tensor(centre).view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2)[None, None].float()


def test_mask_prompt_maps_cover_to_logits() -> None:
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., :4, :, :] = 1
    low = mask_prompt(mask, (4, 4, 4), 3.0)
    assert torch.equal(low[..., :2, :, :], torch.full((1, 1, 2, 4, 4), 3.0))
    assert torch.equal(low[..., 2:, :, :], torch.full((1, 1, 2, 4, 4), -3.0))
    half = mask_prompt(mask, (1, 1, 1), torch.tensor([2.0]))
    assert half.item() == pytest.approx(0.0)


def test_click_inferer_starts_from_the_mask_then_applies_the_clicks(tiny: MSAM) -> None:
    """Same logits as decoding by hand from mask_prompt(initial_mask); a different mask gives different logits."""
    torch.manual_seed(1)
    image = torch.randn(1, 1, 32, 32, 32)
    mask = _ball(32, (12, 14, 16), 6)
    fg, bg = [[12, 14, 16], [20, 20, 20]], [[4, 4, 4]]
    inferer = ClickInferer(mode="cumulative", initial_mask_scale=4.0)
    with torch.no_grad():
        got = inferer(image, tiny, fg, bg, initial_mask=mask)
        state = tiny.prepare_embedding(tiny.encode(image))
        low = mask_prompt(mask, tiny.low_res_size, 4.0)
        points = torch.tensor([fg + bg])
        labels = torch.tensor([[1, 1, 0]])
        for i in range(3):
            low = tiny.decode(state, points[:, : i + 1], labels[:, : i + 1], low)
        torch.testing.assert_close(got, tiny.upsample(low))
        plain = inferer(image, tiny, fg, bg)
        assert not torch.allclose(plain, got), "the starting mask changed nothing"
        only_mask = inferer(image, tiny, None, None, initial_mask=mask)
        torch.testing.assert_close(
            only_mask, tiny.upsample(tiny.decode(state, None, None, mask_prompt(mask, tiny.low_res_size, 4.0)))
        )


def test_click_history_is_not_reused_across_starting_masks(tiny: MSAM) -> None:
    """Resuming after earlier clicks is only right on the same starting mask."""
    image = torch.randn(1, 1, 32, 32, 32)
    a, b = _ball(32, (12, 14, 16), 6), _ball(32, (18, 14, 16), 5)
    inferer = ClickInferer(mode="cumulative")
    fg = [[12, 14, 16], [18, 14, 16]]
    with torch.no_grad():
        inferer(image, tiny, fg, None, initial_mask=a)
        assert inferer.last_decode_steps == 2
        inferer(image, tiny, fg + [[20, 20, 20]], None, initial_mask=a)
        assert inferer.last_decode_steps == 1  # resumed
        again = inferer(image, tiny, fg, None, initial_mask=b)
        assert inferer.last_decode_steps == 2  # another mask: everything decoded again
        fresh = ClickInferer(mode="cumulative")(image, tiny, fg, None, initial_mask=b)
        torch.testing.assert_close(again, fresh)
        with pytest.raises(ValueError, match="initial_mask must be"):
            inferer(image, tiny, fg, None, initial_mask=torch.zeros(1, 1, 16, 16, 16))


# ---- through the bundle's inference.yaml ---------------------------------------------------------------------------


def _case(root: Path, affine: np.ndarray, shape=(40, 36, 24)) -> tuple[Path, Path, list[int]]:
    """A CT-like image and a KiTS19-style label map (1 kidney, 2 tumour) on the same grid; a click in the tumour."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array(shape) // 2 + [7, -6, 4]  # off-centre, so a flipped or permuted mask would miss the click
    tumour = ((grid - centre.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 6**2
    kidney = (((grid - (centre + [0, 6, 0]).reshape(3, 1, 1, 1)) ** 2).sum(0) <= 7**2) & ~tumour
    image = np.where(tumour, 90, np.where(kidney, 180, 30)).astype(np.int16)
    seg = (kidney * 1 + tumour * 2).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(root / "image.nii.gz"))
    nib.save(nib.Nifti1Image(seg, affine), str(root / "seg.nii.gz"))
    return root / "image.nii.gz", root / "seg.nii.gz", [int(v) for v in centre]


def _workflow(image: Path, click: list[int], ckpt: Path, out: Path, **extra) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / "inference.yaml"), str(SMALL)],
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        image_path=str(image),
        foreground=[click],
        background=[],
        ckpt_path=str(ckpt),
        output_dir=str(out),
        **extra,
    )
    wf.initialize()
    return wf


GEOMETRIES = input_geometries()


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_bundle_inference_edits_a_given_mask_in_the_input_geometry(
    geometry: str, small_bundle_checkpoint: Path, tmp_path: Path
):
    """The selected labels of --initial_mask reach the inferer as the window's binary mask, aligned with the image; the
    written mask has the input's shape and affine."""
    image, seg, click = _case(tmp_path / "case", GEOMETRIES[geometry])
    wf = _workflow(image, click, small_bundle_checkpoint, tmp_path / "out", initial_mask=str(seg))
    item = wf.dataset[0]
    window, mask = item["image"], item["initial_mask"]
    assert mask.shape == window.shape and set(torch.unique(mask).tolist()) == {0.0, 1.0}
    # the window is centred on the click at the tumour's centre: the mask's tumour must sit there too
    centroid = torch.nonzero(mask[0] > 0).float().mean(0)
    expected = (torch.tensor(window.shape[1:]).float() - 1) / 2
    assert torch.all((centroid - expected).abs() <= 1.5), (centroid.tolist(), expected.tolist())
    kidney = _workflow(
        image, click, small_bundle_checkpoint, tmp_path / "kidney", initial_mask=str(seg), initial_label=[1]
    )
    assert not torch.equal(kidney.dataset[0]["initial_mask"], mask)
    batch = next(iter(wf.parser.get_parsed_content("dataloader")))
    _, _, _, kwargs = wf.evaluator.prepare_batch(batch, torch.device("cpu"))
    assert torch.equal(kwargs["initial_mask"].as_tensor()[0], mask.as_tensor())
    wf.run()
    wf.finalize()
    written = list((tmp_path / "out").glob("*_seg.nii.gz"))
    assert len(written) == 1
    result, source = nib.load(str(written[0])), nib.load(str(image))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)


@pytest.mark.parametrize("fault", ["shape", "affine"])
def test_initial_mask_on_another_grid_is_refused_naming_the_file(
    fault: str, small_bundle_checkpoint: Path, tmp_path: Path
) -> None:
    image, seg, click = _case(tmp_path / "case", GEOMETRIES["ras"])
    other = tmp_path / f"other_{fault}.nii.gz"
    data = np.asarray(nib.load(str(seg)).dataobj)
    if fault == "shape":
        nib.save(nib.Nifti1Image(data[:-2], GEOMETRIES["ras"]), str(other))
    else:
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 1.5, 2.5, 1.0])), str(other))
    wf = _workflow(image, click, small_bundle_checkpoint, tmp_path / "out", initial_mask=str(other))
    with pytest.raises(Exception) as err:
        wf.dataset[0]
    text = "".join(str(e) for e in (err.value, err.value.__cause__) if e is not None)
    assert "initial mask" in text and other.name in text and f"different {fault}" in text.replace("shapes", "shape")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- the edit benchmark: evaluation from damaged ground truth -------------------------------------------------------


def _two_lesions(size: int = 32) -> np.ndarray:
    return (_ball(size, (10, 10, 10), 5) + _ball(size, (22, 22, 20), 3))[0, 0].numpy() > 0


@pytest.mark.parametrize("damage", ["none", "dilate", "erode", "drop_lesion", "add_false_positive"])
def test_damage_mask_makes_the_fault_it_names(damage: str) -> None:
    from scipy import ndimage

    from msam_components.transforms import DamageMaskd, damage_mask

    label = _two_lesions()
    out = damage_mask(label, damage, iterations=2)
    again = DamageMaskd(damage=damage)({"label": torch.as_tensor(label[None], dtype=torch.float32)})["initial_mask"]
    assert torch.equal(again[0] > 0, torch.as_tensor(out))  # deterministic, and the transform is the function
    components, count = ndimage.label(out)
    if damage == "none":
        assert np.array_equal(out, label)
    elif damage == "dilate":
        assert out.sum() > label.sum() and (out & label).sum() == label.sum()
    elif damage == "erode":
        assert 0 < out.sum() < label.sum() and not (out & ~label).any()
    elif damage == "drop_lesion":
        assert count == 1 and np.array_equal(out, label & (ndimage.label(label)[0] == 1))
    else:
        added = out & ~label
        assert count == 3 and added.sum() == (ndimage.label(label)[0] == 2).sum()
        assert not (ndimage.binary_dilation(added, iterations=2) & label).any()
    with pytest.raises(ValueError, match="damage must be one of"):
        damage_mask(label, "blur")


def test_evaluation_from_a_dilated_mask_starts_with_a_negative_click(tiny: MSAM) -> None:
    """With initial_mask_key the loop starts from the given mask: a dilated ground truth has only false positives, so the
    first simulated click is negative, where from nothing it is positive."""
    from conftest import click_engine_parts
    from monai.engines import SupervisedEvaluator

    from msam_components.transforms import damage_mask

    label = torch.as_tensor(_two_lesions()[None, None], dtype=torch.float32)
    start = torch.as_tensor(damage_mask(label[0, 0].numpy(), "dilate", 3)[None, None], dtype=torch.float32)
    batch = [{"image": torch.randn(1, 1, 32, 32, 32), "label": label, "initial_mask": start}]
    first_labels = {}
    for key in (None, "initial_mask"):
        loop = click_engine_parts(False, num_clicks=2, strategy="center", initial_mask_key=key)
        evaluator = SupervisedEvaluator(torch.device("cpu"), batch, tiny, decollate=False, **loop)
        evaluator.run()
        first_labels[key] = int(evaluator.state.output["click_labels"][0, 0])
    assert first_labels == {None: 1, "initial_mask": 0}
