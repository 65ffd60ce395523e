"""The fast per-click path (factored mask embedding, low-rank MEA conv, fused decoder upscaling, separable upsampling)
is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam_components.networks import MSAM, MaskDecoder3D, PromptEncoder3D, build_msam
from msam_components.networks.compute_paths import set_attention_impl
from msam_components.networks.interpolation import separable_trilinear
from msam_components.networks.layers import LayerNorm3d
from msam_components.networks.mask_input import FactoredDense, low_rank_mask_conv, mask_conv_kernel

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

F64 = dict(rtol=1e-10, atol=1e-12)


def _randomise(module: nn.Module, scale: float = 0.2, seed: int = 0) -> nn.Module:
    """Perturb every parameter (norm gains and biases included) so no term of the algebra is trivially zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_factored_dense_materialises_the_dense_embedding(with_mask: bool) -> None:
    encoder = _randomise(PromptEncoder3D(embed_dim=24, image_embedding_size=(2, 3, 4), mask_in_chans=8).double())
    masks = torch.randn(2, 1, 8, 12, 16, dtype=torch.float64) if with_mask else None
    _, dense = encoder(None, None, masks, 2)
    factored = encoder.factored_dense_embedding(masks, 2)
    assert isinstance(factored, FactoredDense) and factored.z.shape[1] == (8 if with_mask else 0)
    torch.testing.assert_close(factored.materialise(), dense, rtol=0, atol=0)
    with pytest.raises(ValueError, match="low-res mask must be"):
        encoder.factored_dense_embedding(torch.zeros(2, 1, 8, 8, 8, dtype=torch.float64), 2)


@pytest.mark.parametrize("k", [16, 0], ids=["mask", "no-mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_low_rank_mask_conv_equals_conv_of_normalised_embedding(k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    channels, grid = 40, (3, 4, 5)  # non-cubic, so a transposed axis would show
    conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1).to(dtype)
    norm = _randomise(LayerNorm3d(channels), scale=0.5).to(dtype)
    dense = FactoredDense(
        torch.randn(2, k, *grid, dtype=dtype), torch.randn(channels, k, dtype=dtype), torch.randn(channels, dtype=dtype)
    )
    mask, std = norm.forward_with_std(dense.materialise())
    torch.testing.assert_close(mask, norm(dense.materialise()), rtol=0, atol=0)
    expected = conv(mask)
    fast = low_rank_mask_conv(conv, mask_conv_kernel(conv, norm, dense.weight, dense.bias), dense.z, std)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, expected, **tol)


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_fused_upscaling_matches_the_plain_layers(multimask: bool) -> None:
    torch.manual_seed(0)
    decoder = _randomise(
        MaskDecoder3D(transformer_dim=32, transformer_mlp_dim=16, transformer_num_heads=4, iou_head_hidden_dim=8)
    ).double()
    tokens, pe = torch.randn(2, 32, 2, 3, 4, dtype=torch.float64), torch.randn(1, 32, 2, 3, 4, dtype=torch.float64)
    sparse = torch.randn(2, 3, 32, dtype=torch.float64)
    expected = decoder(tokens, pe, sparse, multimask)
    set_attention_impl(decoder, "fast")
    masks, iou = decoder(tokens, pe, sparse, multimask)
    assert masks.shape == (2, 3 if multimask else 1, 8, 12, 16)
    torch.testing.assert_close(masks, expected[0], **F64)
    torch.testing.assert_close(iou, expected[1], **F64)


def _small_msam(**overrides: object) -> MSAM:
    kwargs = dict(image_size=32, patch_size=4, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2)
    kwargs.update(encoder_global_attn_indexes=(1,), encoder_window_size=11, prompt_embed_dim=48, mask_in_chans=4)
    kwargs.update(decoder_mlp_dim=32, iou_head_hidden_dim=16, mea_num_heads=4, lora_rank=2)
    kwargs.update(overrides)
    return _randomise(build_msam(**kwargs, attention_impl="reference"), scale=0.1).double()


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_fast_decode_matches_reference_values_and_gradients(num_blocks: int) -> None:
    """Values and every parameter's gradient (the feedback mask's too) agree in float64; unused heads get zeros."""
    model = _small_msam(mea_num_blocks=num_blocks)
    image = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    points, labels = torch.tensor([[[10, 20, 5], [3, 3, 3]], [[4, 5, 6], [0, 0, 0]]]), torch.tensor([[1, 0], [1, -1]])
    weight = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    results = {}
    for impl in ("reference", "fast"):
        set_attention_impl(model, impl)
        model.zero_grad()
        feedback = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        feedback.requires_grad_(True)
        state = model.prepare_embedding(model.encode(image))
        assert (state.mask_kernel is not None) == (impl == "fast")
        first = model.decode(state, points, labels, None)
        second = model.decode(state, points, labels, feedback + first)
        ((first + second) * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (first.detach(), second.detach(), feedback.grad.clone(), grads)
    ref, fast = results["reference"], results["fast"]
    for i in range(3):
        torch.testing.assert_close(fast[i], ref[i], **F64)
    assert ref[3].keys() == fast[3].keys()  # the same parameters took part (frozen encoder and IoU head did not)
    for name, grad in ref[3].items():
        torch.testing.assert_close(fast[3][name], grad, rtol=1e-8, atol=1e-10, msg=name)
    assert fast[3]["mea.bidirectional_attentions.0.prompt_conv1.weight"].abs().max() > 0
    assert fast[3]["prompt_encoder.mask_downscaling.6.weight"].abs().max() > 0
    assert fast[3]["mask_decoder.output_hypernetworks_mlps.1.layers.0.weight"].abs().max() == 0


def test_state_prepared_on_one_path_decodes_on_the_other() -> None:
    """A cached state (e.g. in ClickInferer) stays valid when the model is switched between paths."""
    model = _small_msam().eval()
    image = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    points, labels, low = (
        torch.tensor([[[1, 2, 3]]]),
        torch.tensor([[1]]),
        torch.randn(1, 1, 32, 32, 32, dtype=torch.float64),
    )
    with torch.no_grad():
        set_attention_impl(model, "fast")
        fast_state = model.prepare_embedding(model.encode(image))
        fast_out = model.decode(fast_state, points, labels, low)
        set_attention_impl(model, "reference")
        torch.testing.assert_close(model.decode(fast_state, points, labels, low), fast_out, **F64)
        ref_state = model.prepare_embedding(model.encode(image))
        set_attention_impl(model, "fast")
        torch.testing.assert_close(model.decode(ref_state, points, labels, low), fast_out, **F64)


@pytest.mark.parametrize(
    "shape, size",
    [((1, 1, 8, 8, 8), (32, 32, 32)), ((2, 3, 5, 7, 4), (9, 20, 13)), ((1, 2, 8, 6, 8), (3, 5, 8))],
    ids=["x4", "non-integer", "downsampling"],
)
def test_separable_trilinear_equals_interpolate(shape: tuple, size: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*shape[:2], *size, dtype=torch.float64)
    outs, grads = [], []
    for fn in (
        lambda t: F.interpolate(t, size=size, mode="trilinear", align_corners=False),
        lambda t: separable_trilinear(t, size),
    ):
        out = fn(x)
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(outs[1], outs[0], **F64)
    torch.testing.assert_close(grads[1], grads[0], **F64)


def test_separable_trilinear_keeps_the_input_dtype_under_autocast() -> None:
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert separable_trilinear(x, (32, 32, 32)).dtype == torch.float32
        low = x.to(torch.bfloat16)
        out = separable_trilinear(low, (32, 32, 32))
    expected = F.interpolate(low.float(), size=(32, 32, 32), mode="trilinear", align_corners=False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
