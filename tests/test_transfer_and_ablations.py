"""Paper Table 2 (transfer evaluation) and Table 3 (ablation overlays), and MSD dataset.json input for the bundles."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from msam_components.bundle_tools.new_bundle import main as new_bundle
from msam_components.data import make_kits19_like, make_msd_like
from msam_components.networks import count_parameters

REPO = Path(__file__).resolve().parents[1]
KITS = REPO / "bundles" / "msam_kits19"
SMALL = str(REPO / "tests" / "configs" / "small_bundle.yaml")
ENCODER, PROMPT, DECODER, MEA, LORA16 = 92_924_928, 8_668, 7_575_636, 17_145_024, 589_824


@pytest.mark.parametrize(
    ("overlay", "total", "trainable", "has_mea"),
    [
        ("ablation_without_mea.yaml", ENCODER + LORA16 + PROMPT + DECODER, LORA16 + PROMPT + DECODER, False),
        ("ablation_full_finetune.yaml", ENCODER + PROMPT + DECODER + MEA, ENCODER + PROMPT + DECODER + MEA, True),
        ("ablation_frozen_encoder.yaml", ENCODER + PROMPT + DECODER + MEA, PROMPT + DECODER + MEA, True),
    ],
)
def test_ablation_overlays_build_the_ablated_models(overlay: str, total: int, trainable: int, has_mea: bool) -> None:
    parser = ConfigParser()
    parser.read_config([str(KITS / "configs" / "train.yaml"), str(KITS / "configs" / overlay)])
    net = parser.get_parsed_content("network_def")
    assert net.use_mea == has_mea
    assert count_parameters(net) == total and count_parameters(net, trainable_only=True) == trainable


def test_ablation_overlay_trains(tmp_path: Path) -> None:
    make_kits19_like(tmp_path / "data", num_cases=5, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=0)
    files = [str(KITS / "configs" / "train.yaml"), SMALL, str(KITS / "configs" / "ablation_without_mea.yaml")]
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type="train",
        run_id="training",
        bundle_root=str(KITS),
        dataset_dir=str(tmp_path / "data"),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("mea.") for k in state)


def test_transfer_evaluation_on_every_case_of_another_dataset(tmp_path: Path) -> None:
    """A KiTS19-trained model evaluated on MSD Task08-style data with the target bundle's label mapping."""
    assert new_bundle(["--preset", "msd_task08_hepaticvessel", "--output", str(tmp_path / "bundles")]) == 0
    (target,) = list((tmp_path / "bundles").iterdir())
    make_msd_like(tmp_path / "Task08", num_cases=4, tumour_label=2, shape=(40, 40, 24), seed=2)
    parser = ConfigParser()
    parser.read_config([str(KITS / "configs" / "train.yaml"), SMALL])
    torch.manual_seed(0)
    ckpt = tmp_path / "kits19_model.pt"  # stands in for a model trained on KiTS19 (same architecture)
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    files = [str(target / "configs" / n) for n in ("train.yaml", "evaluate.yaml")] + [SMALL]
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type="train",
        run_id="evaluating",
        bundle_root=str(target),
        dataset_dir=str(tmp_path / "Task08"),
        ckpt_path=str(ckpt),
        output_dir=str(tmp_path / "transfer"),
        eval_data="$@datalist",
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    rows = list(csv.DictReader((tmp_path / "transfer" / "click_metrics.csv").open()))
    assert len(rows) == 4, "transfer evaluation covers every case of the target dataset"
    assert not (tmp_path / "transfer" / "fold.json").exists(), "no split is made when evaluating everything"


def test_bundle_accepts_an_msd_dataset_json(tmp_path: Path) -> None:
    make_msd_like(tmp_path / "data", num_cases=3, tumour_label=2, shape=(32, 32, 24), seed=5)
    parser = ConfigParser()
    parser.read_config([str(KITS / "configs" / "train.yaml"), SMALL])
    parser.update({"dataset_dir": str(tmp_path / "data")})
    datalist = parser.get_parsed_content("datalist")
    assert len(datalist) == 3 and all(Path(d["image"]).is_file() and Path(d["label"]).is_file() for d in datalist)
