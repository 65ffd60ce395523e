"""Every bad input gets a clear error naming the file, key or value at fault (issue: robustness)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import click_engine_parts, exception_messages, make_blob_cases, small_msam_kwargs, write_nifti
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from msam_components.engines import ClickMetricsHandler, msam_optimizer
from msam_components.networks import CheckpointError, build_msam

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
KITS = REPO / "bundles" / "msam_kits19" / "configs"


_messages, _nifti = exception_messages, write_nifti


def _train_preprocessing():
    parser = ConfigParser()
    parser.read_config([str(KITS / "train.yaml"), str(SMALL)])
    return parser.get_parsed_content("validate#preprocessing")


def _infer_preprocessing():
    parser = ConfigParser()
    parser.read_config([str(KITS / "inference.yaml"), str(SMALL)])
    return parser.get_parsed_content("preprocessing")


def _case(tmp_path: Path, image: np.ndarray, label: np.ndarray, label_affine: np.ndarray | None = None) -> dict:
    return {
        "image": str(_nifti(tmp_path / "img.nii.gz", image)),
        "label": str(_nifti(tmp_path / "seg.nii.gz", label, label_affine)),
    }


def _good_volumes() -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).normal(0, 100, (24, 24, 16)).astype(np.float32)
    label = np.zeros((24, 24, 16), np.uint8)
    label[10:14, 10:14, 6:9] = 2
    return image, label


def test_good_case_passes(tmp_path: Path) -> None:
    out = _train_preprocessing()(_case(tmp_path, *_good_volumes()))
    assert out["image"].shape == (1, 32, 32, 32)


def test_missing_nifti_names_the_file(tmp_path: Path) -> None:
    image, label = _good_volumes()
    case = _case(tmp_path, image, label)
    case["image"] = str(tmp_path / "does_not_exist.nii.gz")
    with pytest.raises(Exception) as err:
        _train_preprocessing()(case)
    assert "does_not_exist.nii.gz" in _messages(err.value)


def test_corrupt_nifti_names_the_file(tmp_path: Path) -> None:
    image, label = _good_volumes()
    case = _case(tmp_path, image, label)
    Path(case["image"]).write_bytes(b"\x1f\x8b this is not a NIfTI")
    with pytest.raises(Exception) as err:
        _train_preprocessing()(case)
    assert "img.nii.gz" in _messages(err.value)


def test_image_label_shape_mismatch(tmp_path: Path) -> None:
    image, label = _good_volumes()
    with pytest.raises(Exception) as err:
        _train_preprocessing()(_case(tmp_path, image, label[:, :, :12]))
    text = _messages(err.value)
    assert "different shapes" in text and "img.nii.gz" in text and "seg.nii.gz" in text


def test_image_label_affine_mismatch(tmp_path: Path) -> None:
    image, label = _good_volumes()
    shifted = np.diag([1.0, 1.0, 2.5, 1.0])
    with pytest.raises(Exception) as err:
        _train_preprocessing()(_case(tmp_path, image, label, label_affine=shifted))
    text = _messages(err.value)
    assert "different affines" in text and "seg.nii.gz" in text


@pytest.mark.parametrize("shape", [(24, 24), (24, 24, 16, 2)], ids=["2d", "4d"])
def test_wrong_dimensionality(tmp_path: Path, shape: tuple[int, ...]) -> None:
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    with pytest.raises(Exception) as err:
        _train_preprocessing()(_case(tmp_path, image, label))
    text = _messages(err.value)
    assert "img.nii.gz" in text and "expected a single 3-D volume" in text


def test_nan_intensities(tmp_path: Path) -> None:
    image, label = _good_volumes()
    image[0, 0, :3] = np.nan
    image[1, 1, 1] = np.inf
    with pytest.raises(Exception) as err:
        _train_preprocessing()(_case(tmp_path, image, label))
    text = _messages(err.value)
    assert "img.nii.gz" in text and "4 voxel(s) are NaN or infinite" in text


@pytest.mark.parametrize(
    ("foreground", "expected"),
    [
        ([[1000, 5, 5]], "1000"),
        ([[5.5, 5, 5]], "5.5"),
        ("[[5, 5", "foreground"),
        ([[5, 5]], "foreground"),
    ],
    ids=["outside", "non-integer", "malformed-json", "two-coordinates"],
)
def test_bad_clicks(tmp_path: Path, foreground: object, expected: str) -> None:
    image, _ = _good_volumes()
    data = {"image": str(_nifti(tmp_path / "img.nii.gz", image)), "foreground": foreground, "background": []}
    with pytest.raises(Exception) as err:
        _infer_preprocessing()(data)
    assert expected in _messages(err.value)


def test_no_click_at_all(tmp_path: Path) -> None:
    image, _ = _good_volumes()
    data = {"image": str(_nifti(tmp_path / "img.nii.gz", image)), "foreground": [], "background": []}
    with pytest.raises(Exception) as err:
        _infer_preprocessing()(data)
    assert "no click" in _messages(err.value)


def test_config_value_of_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(Exception) as err:
        parser = ConfigParser()
        parser.read_config([str(KITS / "train.yaml"), str(SMALL)])
        parser.update({"num_clicks": "ten"})
        parser.get_parsed_content("validate#inferer")
    assert "num_clicks must be int, got 'ten'" in _messages(err.value)
    with pytest.raises(TypeError, match="lora_rank must be int, got '16'"):
        build_msam(**small_msam_kwargs(lora_rank="16"))


def test_bundle_refuses_checkpoint_with_code(tmp_path: Path) -> None:
    """The inference config loads weights through load_pretrained: a pickled payload is refused, never run."""
    import os

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "model.pt"
    torch.save({"model": Payload()}, evil)
    image, _ = _good_volumes()
    wf = ConfigWorkflow(
        config_file=[str(KITS / "inference.yaml"), str(SMALL)],
        workflow_type="infer",
        image_path=str(_nifti(tmp_path / "img.nii.gz", image)),
        foreground=[[5, 5, 5]],
        ckpt_path=str(evil),
        output_dir=str(tmp_path / "out"),
    )
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert isinstance(err.value, CheckpointError) or "refusing to load" in _messages(err.value)
    assert not marker.exists()


def test_training_skips_cases_without_lesion_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    cases = make_blob_cases(4, seed=3)
    for case in cases[:2]:
        case["label"] = case["label"] * 0
    net = build_msam(**small_msam_kwargs())
    parts = click_engine_parts(True, num_clicks=2, seed=0)
    loop = parts["iteration_update"]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=DataLoader(cases, batch_size=2, shuffle=False),
        network=net,
        optimizer=msam_optimizer(net),
        **parts,
    )
    with caplog.at_level("WARNING", logger="msam_components"):
        trainer.run()
    assert loop.skipped_without_lesion == 4  # 2 empty cases x 2 epochs
    assert "case_00000" in caplog.text and "without target lesion" in caplog.text


def test_evaluation_reports_cases_without_lesion(tmp_path: Path) -> None:
    import json

    cases = make_blob_cases(3, seed=4)
    cases[1]["label"] = cases[1]["label"] * 0
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(cases, batch_size=1),
        network=build_msam(**small_msam_kwargs()),
        **click_engine_parts(False, num_clicks=2, seed=0),
    )
    ClickMetricsHandler(output_dir=tmp_path).attach(evaluator)
    evaluator.run()
    summary = json.loads((tmp_path / "click_metrics_summary.json").read_text())
    assert summary["num_cases"] == 3 and summary["num_cases_without_lesion"] == 1
    assert summary["cases_without_lesion"] == ["case_00001"]
