"""attention_impl="fast" (closed-form padded window + SDPA) reproduces the reference padded attention exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import msam_kwargs_from_reference_config

from msam_components.networks import MSAM, build_msam, fast_attention, load_pretrained
from msam_components.networks.compute_paths import set_attention_impl
from msam_components.networks.fast_attention import global_attention, is_single_padded_window, padded_window_attention
from msam_components.networks.image_encoder import EncoderBlock, ImageEncoderViT3D
from msam_components.networks.lora import LoRAQKV
from msam_components.networks.reference_attention import window_partition, window_unpartition
from msam_components.networks.rel_pos_attention import RelPosSelfAttention

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

LAYOUTS = ["sam-med3d", "decomposed"]
QKV_KINDS = ["lora", "linear", "no-bias"]
# float64: the two paths differ only by summation order; float32: the reference README's CPU tolerance
# float32: sums over a 14^3 window (2744 keys) round to about 1e-5; this CPU build gives up to 1.2e-5
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=3e-5)}
FIXTURE_TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


def _attention(layout: str, qkv_kind: str, dtype: torch.dtype, size: tuple[int, int, int], seed: int = 0):
    """A small attention with every parameter random and non-zero (LoRA B, qkv bias and rel-pos tables included)."""
    torch.manual_seed(seed)
    attn = RelPosSelfAttention(32, 4, size, qkv_bias=qkv_kind != "no-bias", rel_pos_layout=layout)
    if qkv_kind == "lora":
        attn.qkv = LoRAQKV(attn.qkv, 3)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.to(dtype)


def _reference_window(attn: RelPosSelfAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """The explicit computation: zero-pad to windows, attend over every padded token, crop."""
    set_attention_impl(attn, "reference")
    windows, padded = window_partition(x, window)
    return window_unpartition(attn(windows), window, padded, tuple(x.shape[1:4]))


# every qkv kind in float64; float32 (the fixture's tolerance) with LoRA only, to keep the suite fast
CASES = [(k, torch.float64) for k in QKV_KINDS] + [("lora", torch.float32)]


@pytest.mark.parametrize("qkv_kind,dtype", CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grid", [(4, 4, 4), (3, 5, 2), (7, 4, 7), (7, 7, 3)], ids=lambda g: "x".join(map(str, g)))
def test_padded_window_matches_reference(layout: str, qkv_kind: str, dtype: torch.dtype, grid: tuple) -> None:
    attn = _attention(layout, qkv_kind, dtype, (7, 7, 7))
    x = torch.randn(2, *grid, 32, dtype=dtype)
    expected = _reference_window(attn, x, 7)
    torch.testing.assert_close(padded_window_attention(attn, x, 7), expected, **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_window_stable_for_huge_logits(layout: str) -> None:
    """Logits in the thousands overflow a naive exp; the log-sum-exp formulation stays exact."""
    attn = _attention(layout, "lora", torch.float64, (6, 6, 6), seed=1)
    x = 30.0 * torch.randn(1, 4, 4, 4, 32, dtype=torch.float64)
    expected = _reference_window(attn, x, 6)
    actual = padded_window_attention(attn, x, 6)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_padded_window_without_rel_pos() -> None:
    torch.manual_seed(0)
    attn = RelPosSelfAttention(32, 4, (5, 5, 5), use_rel_pos=False).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 4, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(padded_window_attention(attn, x, 5), _reference_window(attn, x, 5), **TOL[torch.float64])


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_global_attention_matches_reference(layout: str, dtype: torch.dtype) -> None:
    attn = _attention(layout, "lora", dtype, (5, 5, 5))
    x = torch.randn(2, 5, 5, 5, 32, dtype=dtype)
    set_attention_impl(attn, "reference")
    expected = attn(x)
    torch.testing.assert_close(global_attention(attn, x), expected, **TOL[dtype])
    set_attention_impl(attn, "fast")
    torch.testing.assert_close(attn(x), expected, **TOL[dtype])


@pytest.mark.parametrize(
    "grid,window", [((6, 6, 6), 4), ((4, 4, 4), 4), ((8, 8, 8), 4)], ids=["multi-padded", "one", "multi"]
)
def test_fallback_windowings_match_reference(grid: tuple, window: int) -> None:
    """Several windows or no padding: the block falls back to the explicit padded computation (with SDPA)."""
    assert not is_single_padded_window(grid, window)
    torch.manual_seed(0)
    block = EncoderBlock(32, 4, 2.0, grid, window_size=window).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, *grid, 32, dtype=torch.float64)
    expected = block(x)
    set_attention_impl(block, "fast")
    torch.testing.assert_close(block(x), expected, **TOL[torch.float64])
    with pytest.raises(ValueError, match="single padded window"):
        padded_window_attention(block.attn, x, window)


def test_fast_path_under_bf16_autocast() -> None:
    """Mixed precision (as on GPU) works: the fast path's bf16 error vs float32 is of the reference path's size."""
    torch.manual_seed(0)
    block = EncoderBlock(64, 4, 2.0, (5, 5, 5), window_size=9)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(1, 5, 5, 5, 64)
    exact = block(x)
    errors = {}
    for impl in ("reference", "fast"):
        set_attention_impl(block, impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x.requires_grad_(True))
        out.float().sum().backward()
        errors[impl] = (out.float() - exact).abs().max().item()
    assert errors["fast"] < 3 * errors["reference"] + 1e-3


def test_attention_impl_is_validated_and_adds_no_parameters() -> None:
    with pytest.raises(ValueError, match="attention_impl"):
        build_msam(image_size=32, patch_size=8, encoder_embed_dim=16, encoder_depth=1, attention_impl="flash")
    encoder = ImageEncoderViT3D(
        image_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, global_attn_indexes=(0,)
    )
    with pytest.raises(ValueError, match="attention_impl"):
        set_attention_impl(encoder, "Fast")
    kwargs = dict(image_size=32, patch_size=4, encoder_embed_dim=24, encoder_depth=2, encoder_num_heads=2)
    kwargs.update(encoder_global_attn_indexes=(1,), prompt_embed_dim=48, mea_num_heads=4, lora_rank=2)
    ref, fast = build_msam(**kwargs, attention_impl="reference"), build_msam(**kwargs, attention_impl="fast")
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    impls = {m.attention_impl for m in fast.modules() if isinstance(m, RelPosSelfAttention)}
    assert impls == {"fast"} and fast.mea.multi_head_self_attention.attention_impl == "fast"


def _fixture_model(fx: dict, dtype: torch.dtype, sammed3d: bool = False) -> MSAM:
    kwargs = msam_kwargs_from_reference_config(fx["config"])
    if sammed3d:
        kwargs.update(use_mea=False, lora_rank=0, encoder_trainable="frozen")
    model = build_msam(**kwargs, attention_impl="fast").to(dtype).eval()
    report = load_pretrained(model, fx["sammed3d_state_dict" if sammed3d else "state_dict"])
    assert report.ok and not report.kept_initialised
    return model


@DTYPES
def test_tiny_fixture_reproduced_with_fast_attention(tiny_fixture: dict, dtype: torch.dtype) -> None:
    fx = tiny_fixture
    ref = fx["float64"] if dtype == torch.float64 else fx
    tol = FIXTURE_TOL[dtype]
    image = fx["image_int8"].to(dtype) * fx["image_scale"]
    model = _fixture_model(fx, dtype)
    with torch.no_grad():
        embedding = model.encode(image)
        torch.testing.assert_close(embedding, ref["image_embedding"].to(dtype), **tol)
        mea = model.mea(fx["mea_in_image"].to(dtype), model.mea.mask_input(fx["mea_in_mask"].to(dtype)))
        torch.testing.assert_close(mea, ref["mea_out_random"].to(dtype), **tol)
        state, low = model.prepare_embedding(embedding), torch.zeros(1, 1, 32, 32, 32, dtype=dtype)
        for i in range(3):
            points, labels = fx["points"][i].view(1, 1, 3), fx["point_labels"][i].view(1, 1)
            low = model.decode(state, points, labels, low)
            torch.testing.assert_close(low, ref[f"low_res_logits_iter{i}"].to(dtype), **tol)
        plain = _fixture_model(fx, dtype, sammed3d=True).encode(image)
        torch.testing.assert_close(plain, ref["sammed3d_image_embedding"].to(dtype), **tol)


def test_gradients_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward through the fast path (closed-form window, SDPA global block and MEA) equals the reference's."""
    calls = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return padded_window_attention(*args)

    monkeypatch.setattr(fast_attention, "padded_window_attention", counted)
    kwargs = dict(image_size=32, patch_size=4, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2)
    kwargs.update(encoder_global_attn_indexes=(1,), encoder_window_size=11, prompt_embed_dim=48, mask_in_chans=4)
    kwargs.update(decoder_mlp_dim=32, iou_head_hidden_dim=16, mea_num_heads=4, lora_rank=2, encoder_trainable="full")
    torch.manual_seed(0)
    ref = build_msam(**kwargs, attention_impl="reference").double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = build_msam(**kwargs, attention_impl="fast").double()
    fast.load_state_dict(ref.state_dict())
    image = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    points, labels = torch.tensor([[[10, 20, 5]]]), torch.tensor([[1]])
    weight = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    grads = []
    for model in (ref, fast):
        model.zero_grad()
        (model(image, points, labels) * weight).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 1  # the windowed block took the closed form (only in the fast model)
    assert grads[1]["image_encoder.blocks.0.attn.qkv.linear_b_q.weight"].abs().max() > 0
    assert grads[1]["image_encoder.blocks.0.attn.rel_pos_h"].abs().max() > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-8, atol=1e-10, msg=name)
