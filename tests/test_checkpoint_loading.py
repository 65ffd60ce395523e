"""load_pretrained: supported formats, strict reports, and refusal of checkpoints that carry code."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import msam_kwargs_from_reference_config

from msam_components.networks import CheckpointError, build_msam, load_pretrained


@pytest.fixture(scope="module")
def tiny_kwargs(tiny_fixture: dict) -> dict:
    return msam_kwargs_from_reference_config(tiny_fixture["config"])


def _sammed3d_trainer_checkpoint(fx: dict) -> dict:
    """What SAM-Med3D's trainer writes: weights under model_state_dict plus an argparse Namespace and metrics."""
    return {
        "epoch": 7,
        "model_state_dict": fx["sammed3d_state_dict"],
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 8e-4, "params": [0, 1]}]},
        "losses": [0.9, 0.7],
        "best_dice": np.float64(0.81),
        "args": argparse.Namespace(task_name="demo", lr=8e-4, img_size=128, multi_click=False),
    }


def test_sammed3d_file_with_namespace_loads(tmp_path: Path, tiny_fixture: dict, tiny_kwargs: dict) -> None:
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save(_sammed3d_trainer_checkpoint(tiny_fixture), path)
    model = build_msam(**tiny_kwargs)
    report = load_pretrained(model, path)
    assert report.source_format == "sam-med3d" and len(report.loaded) == 204
    assert any(k.startswith("mea.") for k in report.kept_initialised)
    torch.testing.assert_close(
        model.image_encoder.pos_embed, tiny_fixture["sammed3d_state_dict"]["image_encoder.pos_embed"].float()
    )


def test_official_msam_file_and_own_model_pt_roundtrip(tmp_path: Path, tiny_fixture: dict, tiny_kwargs: dict) -> None:
    official = tmp_path / "sam_model_dice_best.pth"
    torch.save({"epoch": 3, "model_state_dict": tiny_fixture["state_dict"], "best_dice": 0.5}, official)
    model = build_msam(**tiny_kwargs)
    assert load_pretrained(model, official).source_format == "msam-official"
    own = tmp_path / "model.pt"
    torch.save(model.state_dict(), own)
    again = build_msam(**tiny_kwargs)
    report = load_pretrained(again, own)
    assert report.source_format == "msam-components" and report.ok and len(report.loaded) == 309
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, ddp)
    assert load_pretrained(build_msam(**tiny_kwargs), ddp).ok


def test_strict_report_names_missing_unexpected_and_misshaped(tiny_fixture: dict, tiny_kwargs: dict) -> None:
    state = dict(tiny_fixture["state_dict"])
    del state["bidatt.mlp.lin1.weight"]
    state["bidatt.extra.weight"] = torch.zeros(3)
    state["lora_sam.sam.mask_decoder.iou_token.weight"] = torch.zeros(1, 5)
    model = build_msam(**tiny_kwargs)
    before = model.mea.mlp.lin2.weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, state, strict=True)
    message = str(err.value)
    assert "mea.mlp.lin1.weight" in message and "mea.extra.weight" in message
    assert "mask_decoder.iou_token.weight: checkpoint [1, 5] vs model [1, 96]" in message
    assert torch.equal(model.mea.mlp.lin2.weight, before), "strict failure must load nothing"
    report = load_pretrained(model, state, strict=False)
    assert not report.ok and "mask_decoder.iou_token.weight" not in report.loaded
    assert "mea.mlp.lin2.weight" in report.loaded


def test_mea_checkpoint_into_model_without_mea_is_rejected(tiny_fixture: dict, tiny_kwargs: dict) -> None:
    model = build_msam(**{**tiny_kwargs, "use_mea": False})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_pretrained(model, tiny_fixture["state_dict"])


def test_lora_checkpoint_merges_into_lora_free_model(tiny_fixture: dict, tiny_kwargs: dict) -> None:
    image = tiny_fixture["image_int8"].double() * tiny_fixture["image_scale"]
    with_lora = build_msam(**tiny_kwargs).double().eval()
    load_pretrained(with_lora, tiny_fixture["state_dict"])
    merged = build_msam(**{**tiny_kwargs, "lora_rank": 0, "encoder_trainable": "frozen"}).double().eval()
    report = load_pretrained(merged, tiny_fixture["state_dict"])
    assert report.ok and len(report.merged_lora) == 4
    with torch.no_grad():
        torch.testing.assert_close(merged.encode(image), with_lora.encode(image), rtol=1e-10, atol=1e-10)


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path, tiny_kwargs: dict) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pth") as err:
        load_pretrained(build_msam(**tiny_kwargs), path)
    assert "system" in str(err.value)
    assert not marker.exists(), "the pickled payload must never run"


def test_legacy_pickle_with_code_is_refused(tmp_path: Path, tiny_kwargs: dict) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pth"
    with open(path, "wb") as f:
        pickle.dump({"payload": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError):
        load_pretrained(build_msam(**tiny_kwargs), path)
    assert not marker.exists()


def test_missing_file_and_non_weight_content(tmp_path: Path, tiny_kwargs: dict) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(build_msam(**tiny_kwargs), tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="list"):
        load_pretrained(build_msam(**tiny_kwargs), path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_pretrained(build_msam(**tiny_kwargs), garbage)
