"""Tests for the dataset layout datalist builders, the case-level split and the synthetic data writers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from msam_components.data import (
    brats21_datalist,
    default_target_labels,
    imagestr_labelstr_datalist,
    kits19_datalist,
    make_brats21_like,
    make_imagestr_like,
    make_kits19_like,
    make_msd_like,
    msd_datalist,
    msd_target_labels,
    split_datalist,
)
from msam_components.data.synthetic import main as synthetic_main

KITS_SHAPE = (40, 40, 32)
BRATS_SHAPE = (40, 40, 32)
SMALL_SHAPE = (32, 32, 24)


def _load(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def kits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kits19")
    make_kits19_like(out, num_cases=3, shape=KITS_SHAPE, seed=0)
    return out


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brats21")
    make_brats21_like(out, num_cases=3, shape=BRATS_SHAPE, modalities=("flair", "t1ce"), seed=0)
    return out


# --- KiTS19 -------------------------------------------------------------------------------------------------------


def test_kits19_round_trip(kits_dir: Path) -> None:
    datalist = kits19_datalist(kits_dir)
    assert [d["case"] for d in datalist] == ["case_00000", "case_00001", "case_00002"]
    for item in datalist:
        assert set(item) == {"image", "label", "case"}
        assert Path(item["image"]).name == "imaging.nii.gz" and Path(item["image"]).is_file()
        assert Path(item["label"]).name == "segmentation.nii.gz" and Path(item["label"]).is_file()
        image_nii = nib.load(item["image"])
        assert image_nii.shape == KITS_SHAPE
        np.testing.assert_allclose(np.diag(image_nii.affine)[:3], (1.5, 1.5, 2.5))
        image, seg = _load(item["image"]), _load(item["label"])
        assert seg.dtype == np.uint8 and image.dtype == np.int16
        assert set(np.unique(seg).tolist()) == {0, 1, 2}
        tumour = np.isin(seg, default_target_labels("kits19"))
        assert tumour.sum() > 20
        assert image[0, 0, 0] < -900  # air outside the body
        # contrast CT: the kidney enhances more than the tumour, which is denser than the soft tissue around it
        assert image[seg == 1].mean() > image[seg == 2].mean() + 30
        soft = (image > 0) & (image < 70) & (seg == 0)
        assert image[seg == 2].mean() > np.median(image[soft]) + 20
        assert 70 < image[seg == 2].mean() < 130
        # The tumour touches the kidney (attached to or inside it).
        assert (ndimage.binary_dilation(tumour) & (seg == 1)).any()


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    make_kits19_like(tmp_path / "a", num_cases=2, shape=SMALL_SHAPE, seed=3)
    make_kits19_like(tmp_path / "b", num_cases=1, shape=SMALL_SHAPE, seed=3)
    make_kits19_like(tmp_path / "c", num_cases=1, shape=SMALL_SHAPE, seed=4)
    first = [_load(str(tmp_path / d / "case_00000" / "imaging.nii.gz")) for d in "abc"]
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])
    seg_a = _load(str(tmp_path / "a" / "case_00000" / "segmentation.nii.gz"))
    seg_a1 = _load(str(tmp_path / "a" / "case_00001" / "segmentation.nii.gz"))
    assert not np.array_equal(seg_a, seg_a1)  # different cases differ


def test_kits19_image_only_cases(kits_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "kits"
    shutil.copytree(kits_dir, root)
    (root / "case_00001" / "segmentation.nii.gz").unlink()
    (root / "notes").mkdir()  # unrelated folders are ignored
    assert [d["case"] for d in kits19_datalist(root)] == ["case_00000", "case_00002"]
    full = kits19_datalist(root, require_label=False)
    assert [d["case"] for d in full] == ["case_00000", "case_00001", "case_00002"]
    assert "label" not in full[1] and "label" in full[0]
    for case in ("case_00000", "case_00002"):
        (root / case / "segmentation.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="require_label=False") as err:
        kits19_datalist(root)
    assert str(root) in str(err.value)
    assert len(kits19_datalist(root, require_label=False)) == 3


def test_kits19_case_without_imaging(tmp_path: Path) -> None:
    (tmp_path / "case_00007").mkdir()
    with pytest.raises(FileNotFoundError, match=r"case_00007.*imaging\.nii\.gz"):
        kits19_datalist(tmp_path)


def test_default_target_labels() -> None:
    assert default_target_labels("kits19") == [2]
    assert default_target_labels("BraTS21") == [1, 2, 4]
    with pytest.raises(KeyError, match="msd_target_labels"):
        default_target_labels("msd")


# --- BraTS 2021 ---------------------------------------------------------------------------------------------------


def test_brats21_round_trip(brats_dir: Path) -> None:
    datalist = brats21_datalist(brats_dir, modality=["t1ce", "flair"])
    assert [d["case"] for d in datalist] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    for item in datalist:
        case = item["case"]
        assert [Path(p).name for p in item["image"]] == [f"{case}_t1ce.nii.gz", f"{case}_flair.nii.gz"]
        assert Path(item["label"]).name == f"{case}_seg.nii.gz"
        seg = _load(item["label"])
        flair = _load(item["image"][1])
        assert flair.dtype == np.float32 and flair.shape == BRATS_SHAPE
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        whole = np.isin(seg, default_target_labels("brats21"))
        core = np.isin(seg, [1, 4])
        # Nested labels: the core is wrapped in edema (never touches background), necrosis is wrapped in enhancing.
        assert not (ndimage.binary_dilation(core) & ~whole).any()
        assert not (ndimage.binary_dilation(seg == 1) & ~core).any()
        brain = flair != 0
        assert flair[whole].mean() > flair[brain & ~whole].mean() + 1.0  # lesion brighter on flair
    single = brats21_datalist(brats_dir)
    assert isinstance(single[0]["image"], str) and single[0]["image"].endswith("_flair.nii.gz")
    no_label = brats21_datalist(brats_dir, label_suffix=None)
    assert "label" not in no_label[0]


def test_brats21_missing_files_name_case_and_path(brats_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "brats"
    shutil.copytree(brats_dir, root)
    (root / "LICENSE.txt").write_text("not a case")
    with pytest.raises(FileNotFoundError) as err:
        brats21_datalist(root, modality=["flair", "t2"])
    message = str(err.value)
    assert "'BraTS2021_00000'" in message and "'t2'" in message
    assert str(root / "BraTS2021_00000" / "BraTS2021_00000_t2.nii.gz") in message
    (root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz").unlink()
    missing_seg = r"'BraTS2021_00001' has no 'seg' label: .*BraTS2021_00001_seg\.nii\.gz"
    with pytest.raises(FileNotFoundError, match=missing_seg):
        brats21_datalist(root)
    # Uncompressed .nii is accepted too.
    nii = root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii"
    nib.save(nib.load(str(root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz")), str(nii))
    assert brats21_datalist(root)[1]["label"] == str(nii)


def test_brats_sample_real_data(data_dir: Path) -> None:
    root = data_dir / "brats_sample"
    if not root.is_dir():
        pytest.skip(f"brats_sample not found in {data_dir}")
    datalist = brats21_datalist(root, modality="flair")
    assert [d["case"] for d in datalist] == ["BraTS2015_pat0001", "BraTS2015_pat0002", "BraTS2015_pat0003"]
    assert all(Path(d["image"]).is_file() and Path(d["label"]).is_file() for d in datalist)
    assert len(brats21_datalist(root, modality=["flair", "t1ce"])[0]["image"]) == 2
    with pytest.raises(FileNotFoundError) as err:
        brats21_datalist(root, modality="t1")
    message = str(err.value)
    assert "BraTS case 'BraTS2015_pat0001' has no 't1' image" in message
    assert str(root / "BraTS2015_pat0001" / "BraTS2015_pat0001_t1.nii.gz") in message


# --- MSD and nnU-Net-like -----------------------------------------------------------------------------------------


def test_msd_dataset_json(tmp_path: Path) -> None:
    cases = make_msd_like(tmp_path / "Task99", num_cases=3, num_test=1, shape=SMALL_SHAPE, seed=1)
    dataset_json = tmp_path / "Task99" / "dataset.json"
    text = dataset_json.read_text()
    assert '\n    "name"' in text  # indent 4
    training = msd_datalist(dataset_json)
    assert [d["case"] for d in training] == cases == ["synth_0", "synth_1", "synth_2"]
    for item in training:
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()
        assert "./" not in item["image"]
        seg = _load(item["label"])
        assert set(np.unique(seg).tolist()) == {0, 1, 2}
    test = msd_datalist(tmp_path / "Task99", section="test")  # a folder means <folder>/dataset.json
    assert test == [{"image": str(tmp_path / "Task99" / "imagesTs" / "synth_3.nii.gz"), "case": "synth_3"}]
    assert msd_target_labels(dataset_json) == [2]
    with pytest.raises(KeyError, match=r"no 'validation' section; available sections: \['test', 'training'\]"):
        msd_datalist(dataset_json, section="validation")
    (tmp_path / "Task99" / "labelsTr" / "synth_1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"synth_1\.nii\.gz"):
        msd_datalist(dataset_json)
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        msd_datalist(tmp_path / "nowhere" / "dataset.json")


def test_msd_tumour_label_one(tmp_path: Path) -> None:
    make_msd_like(tmp_path, num_cases=1, num_test=0, tumour_label=1, shape=SMALL_SHAPE)
    seg = _load(msd_datalist(tmp_path / "dataset.json")[0]["label"])
    assert set(np.unique(seg).tolist()) == {0, 1}
    assert msd_target_labels(tmp_path) == [1]


def test_imagestr_labelstr_layout(tmp_path: Path) -> None:
    cases = make_imagestr_like(tmp_path / "nnunet", num_cases=2, shape=SMALL_SHAPE)
    datalist = imagestr_labelstr_datalist(tmp_path / "nnunet")
    assert [d["case"] for d in datalist] == cases == ["synth_000", "synth_001"]
    assert Path(datalist[0]["image"]).name == "synth_000_0000.nii.gz"
    assert Path(datalist[0]["label"]).name == "synth_000.nii.gz"
    assert np.isin(_load(datalist[0]["label"]), [2]).any()
    # Without channel suffix the same file names pair up.
    make_imagestr_like(tmp_path / "plain", num_cases=2, channel_suffix=False, shape=SMALL_SHAPE)
    plain = imagestr_labelstr_datalist(tmp_path / "plain")
    assert [Path(d["image"]).name for d in plain] == ["synth_000.nii.gz", "synth_001.nii.gz"]
    # A second channel turns the image into a list; a missing label is an error naming the expected file.
    shutil.copy(datalist[0]["image"], tmp_path / "nnunet" / "imagesTr" / "synth_000_0001.nii.gz")
    multi = imagestr_labelstr_datalist(tmp_path / "nnunet")
    assert [Path(p).name for p in multi[0]["image"]] == ["synth_000_0000.nii.gz", "synth_000_0001.nii.gz"]
    (tmp_path / "nnunet" / "labelsTr" / "synth_001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"'synth_001'.*labelsTr/synth_001\.nii\.gz"):
        imagestr_labelstr_datalist(tmp_path / "nnunet")
    assert "label" not in imagestr_labelstr_datalist(tmp_path / "nnunet", require_label=False)[1]


# --- wrong layouts ------------------------------------------------------------------------------------------------


def test_wrong_layout_errors_name_the_folder(tmp_path: Path, brats_dir: Path) -> None:
    missing = tmp_path / "missing"
    for build in (kits19_datalist, brats21_datalist, imagestr_labelstr_datalist):
        with pytest.raises(FileNotFoundError, match="does not exist") as err:
            build(missing)
        assert str(missing) in str(err.value) and "layout" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no 'case_\*' folders .*KiTS19 layout") as err:
        kits19_datalist(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"no BraTS case folders .*BraTS 2021 layout") as err:
        brats21_datalist(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"imagesTr.*does not exist; expected the nnU-Net-like layout"):
        imagestr_labelstr_datalist(empty)
    (empty / "imagesTr").mkdir()
    (empty / "labelsTr").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no NIfTI images found in .*imagesTr"):
        imagestr_labelstr_datalist(empty)
    # A BraTS folder given to the KiTS19 builder.
    with pytest.raises(FileNotFoundError, match="KiTS19 layout") as err:
        kits19_datalist(brats_dir)
    assert str(brats_dir) in str(err.value)


# --- split --------------------------------------------------------------------------------------------------------


def _fake_datalist(n: int) -> list[dict[str, str]]:
    return [
        {"image": f"/x/case_{i:05d}.nii.gz", "label": f"/y/case_{i:05d}.nii.gz", "case": f"case_{i:05d}"}
        for i in range(n)
    ]


def test_split_is_deterministic_by_seed() -> None:
    datalist = _fake_datalist(10)
    train, val = split_datalist(datalist, val_fraction=0.2, seed=0)
    assert len(val) == 2 and len(train) == 8
    assert {d["case"] for d in train}.isdisjoint(d["case"] for d in val)
    assert split_datalist(list(reversed(datalist)), val_fraction=0.2, seed=0) == (train, val)  # order-independent
    others = [split_datalist(datalist, val_fraction=0.2, seed=s)[1] for s in range(1, 4)]
    assert any(o != val for o in others)
    assert len(split_datalist(_fake_datalist(2), val_fraction=0.1)[1]) == 1  # at least one validation case
    assert split_datalist(_fake_datalist(1), val_fraction=0.2) == (_fake_datalist(1), [])
    with pytest.raises(ValueError, match="more than once"):
        split_datalist(_fake_datalist(2) + _fake_datalist(1))


def test_split_fold_file_written_then_reused(tmp_path: Path) -> None:
    datalist = _fake_datalist(10)
    fold_file = tmp_path / "folds" / "split.json"
    train, val = split_datalist(datalist, val_fraction=0.3, seed=5, fold_file=fold_file)
    record = json.loads(fold_file.read_text())
    assert record == {
        "seed": 5,
        "val_fraction": 0.3,
        "train": [d["case"] for d in train],
        "validation": [d["case"] for d in val],
    }
    assert '\n    "seed": 5' in fold_file.read_text()
    assert [p.name for p in fold_file.parent.iterdir()] == ["split.json"]  # no temp file left behind
    # Reused as recorded, whatever seed is passed now.
    assert split_datalist(datalist, val_fraction=0.5, seed=99, fold_file=fold_file) == (train, val)
    vanished = val[0]["case"]
    with pytest.raises(KeyError, match=f"case '{vanished}' recorded in fold file"):
        split_datalist([d for d in datalist if d["case"] != vanished], fold_file=fold_file)
    extra = datalist + _fake_datalist(11)[10:]
    with pytest.warns(UserWarning, match="case_00010"):
        new_train, new_val = split_datalist(extra, fold_file=fold_file)
    assert new_val == val and new_train[-1]["case"] == "case_00010"


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_writes_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["--layout", "brats21", "--out", str(out), "--num-cases", "2", "--shape", *map(str, SMALL_SHAPE)]
    assert synthetic_main(args + ["--modalities", "flair"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "BraTS2021_00001" in printed
    assert [d["case"] for d in brats21_datalist(out)] == ["BraTS2021_00000", "BraTS2021_00001"]
    kits_args = ["--layout", "kits19", "--out", str(tmp_path / "k"), "--num-cases", "1", "--shape", "24", "24", "16"]
    assert synthetic_main(kits_args) == 0
    assert len(kits19_datalist(tmp_path / "k")) == 1


def test_large_lesion_case_is_longer_than_a_window() -> None:
    """The large-lesion benchmark's case: one connected tumour longer than the 192 mm full-size window, CT densities."""
    from msam_components.data.synthetic import CT_HU, large_lesion_ct_case

    image, seg = large_lesion_ct_case(0)
    tumour = seg == 2
    assert set(np.unique(seg).tolist()) == {0, 1, 2} and ndimage.label(tumour)[1] == 1
    assert np.ptp(np.argwhere(tumour)[:, 2]) * 2.5 > 192.0
    low, high = CT_HU["tumour"]
    assert low - 30 < float(np.median(image[tumour])) < high + 30
    assert np.array_equal(large_lesion_ct_case(0)[1], seg)  # seeded
