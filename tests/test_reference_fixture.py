"""The port reproduces the upstream reference implementation number for number (tiny fixture, float64 and float32)."""

from __future__ import annotations

import pytest
import torch
from conftest import msam_kwargs_from_reference_config

from msam_components.networks import MSAM, build_msam, load_pretrained

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

# README of ../shared/reference: float64 agrees to ~1e-12, float32 within rtol=atol=1e-5 on CPU
TOLERANCES = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}
PRECISIONS = [torch.float64, torch.float32]


def _reference(fx: dict, dtype: torch.dtype) -> dict:
    return fx["float64"] if dtype == torch.float64 else fx


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOLERANCES[dtype])


def _image(fx: dict, dtype: torch.dtype) -> torch.Tensor:
    return fx["image_int8"].to(dtype) * fx["image_scale"]


def _msam(fx: dict, dtype: torch.dtype, attention_impl: str = "reference") -> MSAM:
    kwargs = msam_kwargs_from_reference_config(fx["config"])
    model = build_msam(**kwargs, attention_impl=attention_impl).to(dtype).eval()
    report = load_pretrained(model, fx["state_dict"])
    assert report.source_format == "msam-official" and report.ok and not report.kept_initialised
    return model


def _sammed3d(fx: dict, dtype: torch.dtype, attention_impl: str = "reference") -> MSAM:
    kwargs = msam_kwargs_from_reference_config(fx["config"])
    kwargs.update(use_mea=False, lora_rank=0, encoder_trainable="frozen", attention_impl=attention_impl)
    model = build_msam(**kwargs).to(dtype).eval()
    report = load_pretrained(model, fx["sammed3d_state_dict"])
    assert report.source_format == "sam-med3d" and report.ok and not report.kept_initialised
    return model


def _click(fx: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fx["points"][i].view(1, 1, 3), fx["point_labels"][i].view(1, 1)


def test_tiny_config_parameter_counts(tiny_fixture: dict) -> None:
    counts = tiny_fixture["config"]["param_counts"]
    model = build_msam(**msam_kwargs_from_reference_config(tiny_fixture["config"]))
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["trainable_under_msam_freezing"]
    assert sum(p.numel() for p in model.mea.parameters()) == counts["mea"]
    assert sum(p.numel() for p in model.mask_decoder.parameters()) == counts["mask_decoder"]
    assert len(model.state_dict()) == tiny_fixture["config"]["num_state_dict_keys"]


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype", PRECISIONS, ids=["float64", "float32"])
def test_msam_path_matches_reference(tiny_fixture: dict, dtype: torch.dtype, impl: str) -> None:
    fx, ref = tiny_fixture, _reference(tiny_fixture, dtype)
    model = _msam(fx, dtype, impl)
    with torch.no_grad():
        embedding = model.encode(_image(fx, dtype))
        _close(embedding, ref["image_embedding"], dtype)
        _close(model.prompt_encoder.get_dense_pe(), ref["dense_pe"], dtype)
        _close(
            model.mea(fx["mea_in_image"].to(dtype), model.mea.mask_input(fx["mea_in_mask"].to(dtype))),
            ref["mea_out_random"],
            dtype,
        )
        low = torch.zeros(1, 1, 32, 32, 32, dtype=dtype)
        sparse_names = ["sparse_emb", "sparse_emb_iter1", "sparse_emb_iter2"]
        iou_names = ["iou_pred", "iou_pred_iter1", "iou_pred_iter2"]
        stats_names = ["logits_full_stats", "logits_full_iter1_stats", "logits_full_iter2_stats"]
        for i in range(3):
            points, labels = _click(fx, i)
            sparse, dense = model.prompt_encoder(points, labels, low, 1)
            _close(sparse, ref[sparse_names[i]], dtype)
            if i == 0:
                _close(dense, ref["dense_emb"], dtype)
                _close(model.mea(embedding, model.mea.mask_input(dense)), ref["mea_out"], dtype)
            low, iou = model.decode(embedding, points, labels, low, return_iou=True)
            _close(low, ref[f"low_res_logits_iter{i}"], dtype)
            _close(iou, ref[iou_names[i]], dtype)
            full = model.upsample(low)
            if i == 0:
                idx = fx["logits_full_index"]
                _close(full[:, :, idx][:, :, :, idx][:, :, :, :, idx], ref["logits_full_sub"], dtype)
            stats = ref[stats_names[i]]
            assert full.numel() == stats["numel"]
            assert int((full > 0.5).sum()) == stats["count_gt_0_5"]
            torch.testing.assert_close(full.double().sum().item(), float(stats["sum"]), rtol=1e-5, atol=1e-3)
            torch.testing.assert_close(full.double().abs().sum().item(), float(stats["abs_sum"]), rtol=1e-5, atol=1e-3)
            torch.testing.assert_close(full.min().item(), float(stats["min"]), **TOLERANCES[dtype])
            torch.testing.assert_close(full.max().item(), float(stats["max"]), **TOLERANCES[dtype])


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype", PRECISIONS, ids=["float64", "float32"])
def test_sammed3d_path_matches_reference(tiny_fixture: dict, dtype: torch.dtype, impl: str) -> None:
    fx, ref = tiny_fixture, _reference(tiny_fixture, dtype)
    model = _sammed3d(fx, dtype, impl)
    with torch.no_grad():
        embedding = model.encode(_image(fx, dtype))
        _close(embedding, ref["sammed3d_image_embedding"], dtype)
        low = torch.zeros(1, 1, 32, 32, 32, dtype=dtype)
        for i in range(3):
            points, labels = _click(fx, i)
            low, iou = model.decode(embedding, points, labels, low, return_iou=True)
            _close(low, ref[f"sammed3d_low_res_logits_iter{i}"], dtype)
            _close(iou, ref[f"sammed3d_iou_pred_iter{i}"], dtype)


def test_prepared_embedding_gives_identical_decode(tiny_fixture: dict) -> None:
    """Caching the MEA's image-only stage per image must not change a click's logits."""
    fx = tiny_fixture
    model = _msam(fx, torch.float64)
    with torch.no_grad():
        embedding = model.encode(_image(fx, torch.float64))
        state = model.prepare_embedding(embedding)
        low = torch.zeros(1, 1, 32, 32, 32, dtype=torch.float64)
        for i in range(3):
            points, labels = _click(fx, i)
            cached = model.decode(state, points, labels, low)
            plain = model.decode(embedding, points, labels, low)
            torch.testing.assert_close(cached, plain, rtol=0, atol=1e-12)
            low = cached


def test_textbook_rel_pos_layout_differs(tiny_fixture: dict) -> None:
    """The upstream broadcasting of relative positions matters: the textbook layout does not reproduce the fixture."""
    fx = tiny_fixture
    kwargs = msam_kwargs_from_reference_config(fx["config"])
    model = build_msam(**kwargs, rel_pos_layout="decomposed", attention_impl="reference").double().eval()
    load_pretrained(model, fx["state_dict"])
    with torch.no_grad():
        embedding = model.encode(_image(fx, torch.float64))
    assert (embedding - fx["float64"]["image_embedding"]).abs().max() > 1e-3
