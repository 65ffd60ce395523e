"""Both bundles on the real sample volumes in ../shared/data: click mapping, output geometry, BraTS layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
# production geometry (128^3 at 1.5 mm) with the tiny test network
PRODUCTION_GEOMETRY = {"image_size": 128, "pixdim": [1.5, 1.5, 1.5], "network_def#patch_size": 16}


def _files(bundle: str, *names: str) -> list[str]:
    return [str(REPO / "bundles" / bundle / "configs" / n) for n in names] + [str(SMALL)]


def _central_lesion_voxel(mask_path: Path, values: tuple[int, ...]) -> list[int]:
    mask = np.isin(np.asarray(nib.load(str(mask_path)).dataobj), values)
    voxels = np.argwhere(mask)
    return [int(v) for v in voxels[np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1))]]


CASES = {
    "sts_ct": ("msam_kits19", "sts_ct/STS_001/CT_image.nii.gz", "sts_ct/STS_001/CT_mask.nii.gz", (1,)),
    "brats": (
        "msam_brats21",
        "brats_sample/BraTS2015_pat0001/BraTS2015_pat0001_flair.nii.gz",
        "brats_sample/BraTS2015_pat0001/BraTS2015_pat0001_seg.nii.gz",
        (1, 2, 4),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_click_on_disk_lands_in_lesion_after_preprocessing(name: str, data_dir: Path) -> None:
    """The click's position in the 128^3 network input, mapped back to the disk grid, is inside the expert mask."""
    bundle, image, mask, values = CASES[name]
    click = _central_lesion_voxel(data_dir / mask, values)
    parser = ConfigParser()
    parser.read_config(_files(bundle, "inference.yaml"))
    parser.update(PRODUCTION_GEOMETRY)
    preprocessing = parser.get_parsed_content("preprocessing")
    out = preprocessing({"image": str(data_dir / image), "foreground": [click], "background": []})
    assert tuple(out["image"].shape) == (1, 128, 128, 128)
    d, h, w = out["foreground"][0].tolist()
    world = out["image"].affine.double().numpy() @ np.array([d, h, w, 1.0])
    disk_affine = nib.load(str(data_dir / image)).affine
    on_disk = np.rint(np.linalg.inv(disk_affine) @ world)[:3].astype(int)
    lesion = np.isin(np.asarray(nib.load(str(data_dir / mask)).dataobj), values)
    assert np.abs(on_disk - np.array(click)).max() <= 1, f"click {click} came back as {on_disk.tolist()}"
    assert lesion[tuple(on_disk)], f"mapped click {on_disk.tolist()} is outside the lesion"


@pytest.mark.parametrize("name", sorted(CASES))
def test_inference_output_has_input_shape_and_affine(name: str, data_dir: Path, tmp_path: Path) -> None:
    bundle, image, mask, values = CASES[name]
    parser = ConfigParser()
    parser.read_config(_files(bundle, "inference.yaml"))
    parser.update(PRODUCTION_GEOMETRY)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    wf = ConfigWorkflow(
        config_file=_files(bundle, "inference.yaml"),
        meta_file=str(REPO / "bundles" / bundle / "configs" / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(REPO / "bundles" / bundle),
        image_path=str(data_dir / image),
        foreground=[_central_lesion_voxel(data_dir / mask, values)],
        background=[],
        ckpt_path=str(ckpt),
        output_dir=str(tmp_path / "out"),
        **PRODUCTION_GEOMETRY,
    )
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    (written,) = list((tmp_path / "out").glob("*_seg.nii.gz"))
    result, source = nib.load(str(written)), nib.load(str(data_dir / image))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)


def test_brats_bundle_reads_the_sample_layout(data_dir: Path) -> None:
    parser = ConfigParser()
    parser.read_config(_files("msam_brats21", "train.yaml"))
    parser.update({"dataset_dir": str(data_dir / "brats_sample"), **PRODUCTION_GEOMETRY})
    datalist = parser.get_parsed_content("datalist")
    assert [d["case"] for d in datalist] == ["BraTS2015_pat0001", "BraTS2015_pat0002", "BraTS2015_pat0003"]
    assert all(d["image"].endswith("_flair.nii.gz") and d["label"].endswith("_seg.nii.gz") for d in datalist)
    sample = parser.get_parsed_content("validate#preprocessing")(datalist[0])
    assert tuple(sample["image"].shape) == tuple(sample["label"].shape) == (1, 128, 128, 128)
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0}
    parser.update({"modality": "t1ce"})
    parser.ref_resolver.reset()
    assert parser.get_parsed_content("datalist")[0]["image"].endswith("_t1ce.nii.gz")


def test_brats_bundle_reports_a_missing_modality(data_dir: Path) -> None:
    parser = ConfigParser()
    parser.read_config(_files("msam_brats21", "train.yaml"))
    parser.update({"dataset_dir": str(data_dir / "brats_sample"), "modality": "t2"})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("datalist")
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    message = "\n".join(chain)
    assert "BraTS2015_pat0001" in message and "BraTS2015_pat0001_t2.nii.gz" in message
