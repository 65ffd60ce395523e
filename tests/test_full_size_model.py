"""The default model is the paper's full-size M-SAM: counts, state-dict layouts and the forward contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msam_components.networks import MSAM, build_msam, count_parameters, load_pretrained, msam_parameter_groups

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default


@pytest.fixture(scope="module")
def full_model() -> MSAM:
    torch.manual_seed(0)
    return build_msam()


def _random_state_dict(manifest: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {e["key"]: torch.randn(e["shape"], generator=gen) * 0.02 for e in manifest["keys"]}


def test_default_is_paper_model(full_model: MSAM) -> None:
    assert count_parameters(full_model) == 118_244_080
    assert count_parameters(full_model, trainable_only=True) == 25_319_152
    assert round(100 * 25_319_152 / 118_244_080, 2) == 21.41
    assert full_model.lora_rank == 16 and full_model.use_mea


def test_released_code_rank_4_counts() -> None:
    model = build_msam(lora_rank=4)
    assert count_parameters(model) == 117_801_712
    assert count_parameters(model, trainable_only=True) == 24_876_784


def test_freezing_scheme_and_parameter_groups(full_model: MSAM) -> None:
    trainable = {n for n, p in full_model.named_parameters() if p.requires_grad}
    encoder_trainable = {n for n in trainable if n.startswith("image_encoder.")}
    assert encoder_trainable and all(".linear_a_" in n or ".linear_b_" in n for n in encoder_trainable)
    assert all(p.requires_grad for n, p in full_model.named_parameters() if not n.startswith("image_encoder."))
    groups = msam_parameter_groups(full_model, lr=8e-4)
    assert [g["lr"] for g in groups] == pytest.approx([8e-4, 8e-5])
    main = sum(p.numel() for p in groups[0]["params"])
    scaled = sum(p.numel() for p in groups[1]["params"])
    assert main == 589_824 + 17_145_024  # LoRA + MEA
    assert scaled == 8_668 + 7_575_636  # prompt encoder + mask decoder


def test_ablation_switches() -> None:
    plain = build_msam(use_mea=False, lora_rank=0, encoder_trainable="frozen")
    assert count_parameters(plain) == 100_509_232  # SAM-Med3D vit_b_ori
    assert count_parameters(plain, trainable_only=True) == 8_668 + 7_575_636
    full = build_msam(lora_rank=0, encoder_trainable="full")
    assert count_parameters(full, trainable_only=True) == count_parameters(full)
    with pytest.raises(ValueError, match="lora_rank"):
        build_msam(lora_rank=0, encoder_trainable="lora")
    with pytest.raises(ValueError, match="encoder_trainable"):
        build_msam(encoder_trainable="partial")


def test_msam_manifest_loads_strictly_into_rank_4(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "msam_state_dict_manifest.json").read_text())
    model = build_msam(lora_rank=4)
    state = _random_state_dict(manifest)
    assert len(state) == 461
    report = load_pretrained(model, state, strict=True)
    assert report.source_format == "msam-official" and len(report.loaded) == 461 and not report.kept_initialised
    key = "lora_sam.sam.image_encoder.blocks.3.attn.qkv.linear_b_v.weight"
    torch.testing.assert_close(model.image_encoder.blocks[3].attn.qkv.linear_b_v.weight, state[key])
    torch.testing.assert_close(model.mea.mlp.lin2.bias, state["bidatt.mlp.lin2.bias"])


def test_sammed3d_manifest_loads_strictly(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "sammed3d_state_dict_manifest.json").read_text())
    state = _random_state_dict(manifest)
    assert len(state) == 324
    model = build_msam()
    lora_before = model.image_encoder.blocks[0].attn.qkv.linear_a_q.weight.clone()
    report = load_pretrained(model, state, strict=True)
    assert report.source_format == "sam-med3d" and len(report.loaded) == 324
    assert len(report.kept_initialised) == 12 * 4 + 89  # LoRA and MEA stay as initialised
    torch.testing.assert_close(model.image_encoder.blocks[0].attn.qkv.linear_a_q.weight, lora_before)
    torch.testing.assert_close(
        model.image_encoder.blocks[0].attn.qkv.qkv.weight, state["image_encoder.blocks.0.attn.qkv.weight"]
    )
    plain = build_msam(use_mea=False, lora_rank=0, encoder_trainable="frozen")
    assert load_pretrained(plain, state).ok


@pytest.mark.slow
def test_forward_bare_image_shape(full_model: MSAM) -> None:
    with torch.no_grad():
        out = full_model.eval()(torch.randn(1, 1, 128, 128, 128))
    assert out.shape == (1, 1, 128, 128, 128) and torch.isfinite(out).all()


def test_decode_contract_shapes(full_model: MSAM) -> None:
    embedding = torch.randn(2, 384, 8, 8, 8)
    points = torch.tensor([[[64, 60, 70], [10, 20, 30]], [[5, 6, 7], [100, 100, 100]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    with torch.no_grad():
        low = full_model.decode(embedding, points, labels, None)
        low2, iou = full_model.decode(embedding, points, labels, low, return_iou=True)
        multi = full_model.decode(embedding, points, labels, low, multimask_output=True)
    assert low.shape == low2.shape == (2, 1, 32, 32, 32) and iou.shape == (2, 1) and multi.shape == (2, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="points must be"):
        full_model.decode(embedding, points[:, :, :2], labels, None)
    with pytest.raises(ValueError, match="point_labels"):
        full_model.decode(embedding, points, labels[:, :1], None)
    with pytest.raises(ValueError, match="low-res mask"):
        full_model.decode(embedding, points, labels, torch.zeros(2, 1, 16, 16, 16))
