"""The bundles' training input pipeline: MONAI's GPU pattern when the device is CUDA, the CPU pipeline otherwise.

Checked without a GPU: the config is parsed with a CUDA device (nothing is moved there), and the GPU pipeline's
transforms and loader run end to end with ``gpu_pipeline`` forced on a CPU device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, ThreadDataLoader
from monai.transforms import ToDeviced

from msam_components.data import make_kits19_like

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"


def _parser(bundle: str, tmp_path: Path, extra: list[Path] = (), **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([REPO / "bundles" / bundle / "configs" / "train.yaml", *extra])
    parser.update(
        {
            "bundle_root": str(REPO / "bundles" / bundle),
            "dataset_dir": str(tmp_path / "data"),
            "output_dir": str(tmp_path / "eval"),
            "ckpt_dir": str(tmp_path / "models"),
            **overrides,
        }
    )
    return parser


def _pipeline(parser: ConfigParser) -> tuple[bool, type, int, list[object]]:
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    return (
        parser.get_parsed_content("gpu_pipeline"),
        parser.get_parsed_content("train#dataloader#_target_"),
        parser.get_parsed_content("train#dataloader#num_workers"),
        [t for t in transforms if isinstance(t, ToDeviced)],
    )


@pytest.mark.parametrize("bundle", ["msam_kits19", "msam_brats21"])
def test_cuda_device_selects_the_gpu_pipeline(bundle: str, tmp_path: Path) -> None:
    on_gpu, loader, workers, to_device = _pipeline(_parser(bundle, tmp_path, device="$torch.device('cuda:0')"))
    assert on_gpu is True and loader is ThreadDataLoader and workers == 0
    assert len(to_device) == 1 and to_device[0].converter.device == torch.device("cuda:0")
    on_gpu, loader, workers, to_device = _pipeline(_parser(bundle, tmp_path, device="cpu"))
    assert on_gpu is False and loader is DataLoader and workers == 4 and to_device == []
    # a string device from the command line and an explicit opt-out
    assert _parser(bundle, tmp_path, device="cuda:1").get_parsed_content("gpu_pipeline") is True
    _, loader, _, to_device = _pipeline(_parser(bundle, tmp_path, device="cuda:0", gpu_pipeline="false"))
    assert loader is DataLoader and to_device == []


def test_the_gpu_pipeline_loads_batches(tmp_path: Path) -> None:
    """CacheDataset, ToDeviced, the random crop and flips and ThreadDataLoader, run here on a CPU device."""
    make_kits19_like(tmp_path / "data", num_cases=3, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=0)
    parser = _parser("msam_kits19", tmp_path, [SMALL], device="cpu", gpu_pipeline=True, val_fraction=0.34)
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader, ThreadDataLoader) and loader.num_workers == 0
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (2, 1, 32, 32, 32) and tuple(batch["label"].shape) == (2, 1, 32, 32, 32)
    assert batch["label"].sum() > 0
