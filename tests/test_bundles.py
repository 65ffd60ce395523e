"""Both bundles end to end through MONAI's ConfigWorkflow: train, evaluate and infer on tiny data in official layouts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

from msam_components.data import make_brats21_like, make_kits19_like

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
BUNDLES = {
    "msam_kits19": lambda d: make_kits19_like(d, num_cases=5, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=0),
    "msam_brats21": lambda d: make_brats21_like(d, num_cases=5, shape=(40, 40, 32), seed=0),
}


def configs(bundle: str, *names: str) -> list[str]:
    return [str(REPO / "bundles" / bundle / "configs" / n) for n in names]


def _workflow(bundle: str, files: list[str], workflow_type: str, run_id: str = "run", **override) -> ConfigWorkflow:
    meta = str(REPO / "bundles" / bundle / "configs" / "metadata.json")
    wf = ConfigWorkflow(config_file=files, meta_file=meta, workflow_type=workflow_type, run_id=run_id, **override)
    wf.initialize()
    missing = wf.check_properties()
    assert not missing, f"{bundle}: missing bundle properties {missing}"
    return wf


def tumour_click(seg_path: Path, values: tuple[int, ...]) -> list[int]:
    """The lesion voxel nearest the lesion centroid, in on-disk voxel indices."""
    seg = np.isin(np.asarray(nib.load(str(seg_path)).dataobj), values)
    voxels = np.argwhere(seg)
    return [int(v) for v in voxels[np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1))]]


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def trained_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train each bundle for one tiny epoch on synthetic data in its official layout (shared by the tests below)."""
    bundle = request.param
    root = tmp_path_factory.mktemp(bundle)
    data_dir = root / "data"
    BUNDLES[bundle](data_dir)
    paths = dict(
        bundle_root=str(REPO / "bundles" / bundle),
        dataset_dir=str(data_dir),
        ckpt_dir=str(root / "models"),
        output_dir=str(root / "eval"),
    )
    wf = _workflow(bundle, configs(bundle, "train.yaml") + [str(SMALL)], "train", run_id="training", **paths)
    wf.run()
    wf.finalize()
    return {"bundle": bundle, "root": root, "data_dir": data_dir, "paths": paths}


def test_training_writes_checkpoint_and_fold(trained_bundle: dict) -> None:
    root = trained_bundle["root"]
    assert (root / "models" / "model.pt").is_file()
    fold = json.loads((root / "eval" / "fold.json").read_text())
    assert len(fold["train"]) == 4 and len(fold["validation"]) == 1
    assert (root / "eval" / "validation" / "click_metrics.csv").is_file()


def test_evaluate_writes_per_click_reports(trained_bundle: dict) -> None:
    bundle, root = trained_bundle["bundle"], trained_bundle["root"]
    files = configs(bundle, "train.yaml", "evaluate.yaml") + [str(SMALL)]
    paths = {**trained_bundle["paths"], "output_dir": str(root / "evaluation")}
    wf = _workflow(bundle, files, "train", run_id="evaluating", ckpt_path=str(root / "models" / "model.pt"), **paths)
    wf.run()
    wf.finalize()
    out = root / "evaluation"
    rows = list(csv.DictReader((out / "click_metrics.csv").open()))
    assert len(rows) == 1 and sum(k.startswith("dice_click_") for k in rows[0]) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"dice_last_click", "iou_last_click"}
    assert (out / "click_metrics.png").is_file() and (out / "click_metrics_summary.json").is_file()
    lesions = json.loads((out / "lesion_metrics.json").read_text())
    assert lesions["num_cases"] == 1 and lesions["lesions_found"] + lesions["lesions_missed"] >= 1


@pytest.mark.parametrize("start", ["dilate", "drop_lesion"])
def test_evaluate_from_a_damaged_mask(trained_bundle: dict, start: str) -> None:
    """--eval_start runs the click loop from a damaged ground truth and reports the same per-click measures."""
    bundle, root = trained_bundle["bundle"], trained_bundle["root"]
    files = configs(bundle, "train.yaml", "evaluate.yaml") + [str(SMALL)]
    paths = {**trained_bundle["paths"], "output_dir": str(root / f"evaluation_{start}")}
    ckpt = str(root / "models" / "model.pt")
    wf = _workflow(bundle, files, "train", run_id="evaluating", ckpt_path=ckpt, eval_start=start, **paths)
    assert wf.parser.get_parsed_content("validate#click_loop").initial_mask_key == "initial_mask"
    wf.run()
    wf.finalize()
    summary = json.loads((root / f"evaluation_{start}" / "click_metrics_summary.json").read_text())
    assert summary["num_cases_in_means"] == 1 and len(summary["mean_dice_per_click"]) == 3


def test_inference_writes_mask_in_input_geometry(trained_bundle: dict) -> None:
    bundle, root, data_dir = trained_bundle["bundle"], trained_bundle["root"], trained_bundle["data_dir"]
    fold = json.loads((root / "eval" / "fold.json").read_text())
    case = fold["validation"][0]
    if bundle == "msam_kits19":
        image, seg, values = data_dir / case / "imaging.nii.gz", data_dir / case / "segmentation.nii.gz", (2,)
    else:
        image, seg, values = data_dir / case / f"{case}_flair.nii.gz", data_dir / case / f"{case}_seg.nii.gz", (1, 2, 4)
    out = root / "inference"
    wf = _workflow(
        bundle,
        configs(bundle, "inference.yaml") + [str(SMALL)],
        "infer",
        bundle_root=trained_bundle["paths"]["bundle_root"],
        image_path=str(image),
        foreground=[tumour_click(seg, values)],
        background=[],
        ckpt_path=str(root / "models" / "model.pt"),
        output_dir=str(out),
    )
    wf.run()
    wf.finalize()
    written = list(out.glob("*_seg.nii.gz"))
    assert len(written) == 1
    result, source = nib.load(str(written[0])), nib.load(str(image))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(result.dataobj))) <= {0, 1}


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_metadata_is_valid(bundle: str, schema_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"  # verify_metadata may write next to --filepath; keep ../shared untouched
    schema.write_bytes((schema_dir / "meta_schema_20240725.json").read_bytes())
    verify_metadata(meta_file=str(REPO / "bundles" / bundle / "configs" / "metadata.json"), filepath=str(schema))
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "tumor"}
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [128, 128, 128] and image["dtype"] == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_network_in_out_matches_metadata(bundle: str) -> None:
    """The full-size network of each bundle maps the metadata's input to its output (one full-size CPU forward)."""
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(REPO / "bundles" / bundle / "configs" / "metadata.json"),
        config_file=configs(bundle, "train.yaml"),
        device="cpu",
        bundle_root=str(REPO / "bundles" / bundle),
    )


def test_multi_gpu_override_runs_on_two_cpu_processes(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes trains one tiny epoch through multi_gpu_train.yaml."""
    bundle = "msam_kits19"
    make_kits19_like(tmp_path / "data", num_cases=8, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=0)  # 2 val cases
    files = configs(bundle, "train.yaml", "multi_gpu_train.yaml") + [str(SMALL)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", str(files)]
    cmd += ["--bundle_root", str(REPO / "bundles" / bundle), "--dataset_dir", str(tmp_path / "data")]
    cmd += ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "Epoch[1] Complete" in result.stdout + result.stderr
