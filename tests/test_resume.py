"""Crash-safe training: atomic checkpoints, resume after SIGKILL, and reproducible seeded evaluation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msam_components.data import make_kits19_like
from msam_components.engines import atomic_torch_save

REPO = Path(__file__).resolve().parents[1]
KITS = REPO / "bundles" / "msam_kits19"
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    files = [str(KITS / "configs" / "train.yaml"), str(SMALL)]
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(files),
        "--bundle_root", str(KITS), "--dataset_dir", str(data), "--ckpt_dir", str(out / "models"),
        "--output_dir", str(out / "eval"), "--num_epochs", "5", "--val_interval", "5", *extra,
    ]  # fmt: skip


def test_killed_run_resumes_and_finishes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_kits19_like(data, num_cases=5, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _train_cmd(data, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    seen = []
    try:
        for line in proc.stdout:  # kill in the middle of epoch 3, after its first iteration
            seen.append(line)
            if "Epoch: 3/5, Iter: 1/" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    ckpt = torch.load(tmp_path / "models" / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["trainer"]["epoch"] == 2, "the last complete epoch must be on disk"

    result = subprocess.run(
        _train_cmd(data, tmp_path, "--resume", "true"), capture_output=True, text=True, env=env, timeout=600
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "continuing after epoch 2" in log
    assert "Epoch: 1/5" not in log and "Epoch: 2/5" not in log and "Epoch[5] Complete" in log
    final = torch.load(tmp_path / "models" / "checkpoint_latest.pt", weights_only=True)
    assert final["trainer"]["epoch"] == 5
    assert final["lr_scheduler"]["last_epoch"] == 5


def test_interrupted_write_never_replaces_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint_latest.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    good = torch.load(path, weights_only=True)
    assert good["epoch"] == 1 and torch.equal(good["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"], "no temporary file left behind"


def test_seeded_evaluations_give_identical_csvs(tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    data = tmp_path / "data"
    make_kits19_like(data, num_cases=5, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=1)
    files = [str(KITS / "configs" / n) for n in ("train.yaml", "evaluate.yaml")] + [str(SMALL)]
    torch.manual_seed(0)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    ckpt = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    csvs = []
    for run in ("a", "b"):
        wf = ConfigWorkflow(
            config_file=files,
            workflow_type="train",
            run_id="evaluating",
            bundle_root=str(KITS),
            dataset_dir=str(data),
            ckpt_path=str(ckpt),
            output_dir=str(tmp_path / run),
            val_fraction=0.6,
        )
        wf.initialize()
        wf.run()
        wf.finalize()
        csvs.append((tmp_path / run / "click_metrics.csv").read_text())
    assert csvs[0] == csvs[1] and csvs[0].count("\n") == 4  # header + 3 validation cases
