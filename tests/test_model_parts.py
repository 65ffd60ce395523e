"""MSAM is composed of its parts; the builder is the one place that makes them (sizes, LoRA, compute path, presets)."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import small_msam_kwargs

from msam_components.networks import (
    MSAM,
    PRESETS,
    ImageEncoderViT3D,
    MaskDecoder3D,
    MaskEnhancedAdapter,
    PromptEncoder3D,
    add_lora,
    build_msam,
    count_parameters,
    msam_of_sizes,
    set_attention_impl,
    set_encoder_trainable,
)

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_composing_the_parts_by_hand_equals_the_builder() -> None:
    """As segment-anything's ``Sam(image_encoder, prompt_encoder, mask_decoder)``: the parts, built in the builder's
    order from one seed, composed by hand, give the builder's model parameter for parameter and output for output."""
    kwargs = small_msam_kwargs(image_size=32, patch_size=4)
    torch.manual_seed(0)
    built = build_msam(**kwargs, encoder_trainable="lora", click_stamp=2.0, attention_impl="reference")
    torch.manual_seed(0)
    encoder = ImageEncoderViT3D(
        image_size=32,
        patch_size=4,
        embed_dim=kwargs["encoder_embed_dim"],
        depth=kwargs["encoder_depth"],
        num_heads=kwargs["encoder_num_heads"],
        out_chans=kwargs["prompt_embed_dim"],
        global_attn_indexes=kwargs["encoder_global_attn_indexes"],
        window_size=kwargs["encoder_window_size"],
    )
    dim = kwargs["prompt_embed_dim"]
    prompt = PromptEncoder3D(dim, (8, 8, 8), (32, 32, 32), kwargs["mask_in_chans"])
    decoder = MaskDecoder3D(
        dim,
        transformer_num_heads=kwargs.get("decoder_num_heads", 8),
        transformer_mlp_dim=kwargs["decoder_mlp_dim"],
        iou_head_hidden_dim=kwargs["iou_head_hidden_dim"],
    )
    mea = MaskEnhancedAdapter(dim, kwargs.get("mea_num_heads", 6), 4.0, (8, 8, 8))
    composed = MSAM(add_lora(encoder, kwargs["lora_rank"]), prompt, decoder, mea, click_stamp=2.0)
    set_encoder_trainable(composed, "lora")
    set_attention_impl(composed, "reference")
    _same_state(built, composed)
    assert (composed.image_size, composed.low_res_size, composed.click_stamp, composed.lora_rank) == (
        32,
        (32, 32, 32),
        2.0,
        kwargs["lora_rank"],
    )
    assert [n for n, p in built.named_parameters() if p.requires_grad] == [
        n for n, p in composed.named_parameters() if p.requires_grad
    ]
    image = torch.randn(1, 1, 32, 32, 32)
    points, labels = torch.tensor([[[10, 12, 14]]]), torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(built(image, points, labels), composed(image, points, labels), rtol=0, atol=0)
    without_mea = MSAM(encoder, prompt, decoder)
    assert not without_mea.use_mea and without_mea.encoder_trainable == "full"


def test_msam_takes_only_its_parts() -> None:
    """No construction logic in the model: its arguments are the four parts and the click-stamp prompt setting."""
    names = list(inspect.signature(MSAM.__init__).parameters)[1:]
    assert names == ["image_encoder", "prompt_encoder", "mask_decoder", "mea", "click_stamp", "click_stamp_sigma"]


def test_presets_name_the_sizes_this_project_uses() -> None:
    assert count_parameters(build_msam("paper")) == 118_244_080  # the paper's count (msam_reference.md)
    assert count_parameters(build_msam("paper"), trainable_only=True) == 25_319_152
    assert count_parameters(build_msam("released")) == 117_801_712
    sam_med3d = build_msam("sam-med3d")
    assert not sam_med3d.use_mea and sam_med3d.lora_rank == 0 and sam_med3d.encoder_trainable == "full"
    demo = build_msam("demo")
    assert demo.image_size == 64 and demo.embedding_size == (8, 8, 8) and demo.lora_rank == 0
    tiny = build_msam("tiny", use_mea=False)
    assert tiny.image_size == 32 and not tiny.use_mea
    assert set(PRESETS) == {"paper", "sam-med3d", "released", "demo", "tiny"}
    with pytest.raises(ValueError, match="unknown M-SAM preset"):
        build_msam("huge")
    with pytest.raises(TypeError, match="unknown argument.*'encoder_dept'"):
        build_msam("tiny", encoder_dept=3)
    with pytest.raises(ValueError, match="click_stamp"):
        build_msam("tiny", click_stamp=-1.0)


def test_the_demo_config_names_the_demo_preset() -> None:
    from pathlib import Path

    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundles" / "msam_kits19" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "demo.yaml")])
    assert parser["network_def"]["preset"] == "@network_preset" and parser["network_preset"] == "demo"
    from_config = parser.get_parsed_content("network_def")
    preset = build_msam("demo", click_stamp=from_config.click_stamp, click_stamp_sigma=from_config.click_stamp_sigma)
    assert {k: v.shape for k, v in from_config.state_dict().items()} == {
        k: v.shape for k, v in preset.state_dict().items()
    }


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(encoder_depth=2.0), "encoder_depth must be int"),
        (dict(use_mea=1), "use_mea must be bool"),
        (dict(lora_rank=True), "lora_rank must be int"),
        (dict(mea_mlp_ratio="4"), "mea_mlp_ratio must be int or float"),
        (dict(click_stamp=None), "click_stamp must be int or float"),
        (dict(attention_impl="flash"), "attention_impl must be one of"),
    ],
)
def test_argument_types_are_checked_against_the_signature(kwargs: dict, message: str) -> None:
    """Types come from the annotations of ``msam_of_sizes`` (no separate list of names to keep in step)."""
    error = ValueError if "attention_impl" in kwargs else TypeError
    with pytest.raises(error, match=message):
        msam_of_sizes(image_size=32, patch_size=8, encoder_embed_dim=16, **kwargs)
    with pytest.raises(error, match=message):
        build_msam("tiny", **kwargs)
