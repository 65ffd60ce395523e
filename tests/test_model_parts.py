"""MSAM built from its parts and from size presets: the same model, parameter for parameter, as the flat constructor."""

from __future__ import annotations

import pytest
import torch
from conftest import small_msam_kwargs

from msam_components.networks import MSAM, PRESETS, build_msam, build_parts, count_parameters

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_from_parts_equals_the_flat_constructor() -> None:
    kwargs = small_msam_kwargs(image_size=32, patch_size=4)
    sizes = {k: v for k, v in kwargs.items() if k != "lora_rank"}
    torch.manual_seed(0)
    flat = MSAM(**kwargs, encoder_trainable="lora", click_stamp=2.0)
    torch.manual_seed(0)
    composed = MSAM.from_parts(build_parts(**sizes), lora_rank=2, encoder_trainable="lora", click_stamp=2.0)
    _same_state(flat, composed)
    assert (composed.image_size, composed.low_res_size, composed.click_stamp) == (32, (32, 32, 32), 2.0)
    assert [n for n, p in flat.named_parameters() if p.requires_grad] == [
        n for n, p in composed.named_parameters() if p.requires_grad
    ]
    image = torch.randn(1, 1, 32, 32, 32)
    points, labels = torch.tensor([[[10, 12, 14]]]), torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(flat(image, points, labels), composed(image, points, labels))
    without_mea = MSAM.from_parts(build_parts(**sizes, use_mea=False))
    assert not without_mea.use_mea and without_mea.lora_rank == 0


def test_presets_name_the_sizes_this_project_uses() -> None:
    assert count_parameters(build_msam("paper")) == 118_244_080  # the paper's count (msam_reference.md)
    assert count_parameters(build_msam("released")) == 117_801_712
    demo = build_msam("demo")
    assert demo.image_size == 64 and demo.embedding_size == (8, 8, 8) and demo.lora_rank == 0
    tiny = build_msam("tiny", use_mea=False)
    assert tiny.image_size == 32 and not tiny.use_mea
    assert set(PRESETS) == {"paper", "released", "demo", "tiny"}
    with pytest.raises(ValueError, match="unknown M-SAM preset"):
        build_msam("huge")
    with pytest.raises(ValueError, match="click_stamp"):
        MSAM(**{k: v for k, v in PRESETS["tiny"].items()}, click_stamp=-1.0)


def test_the_demo_preset_is_the_size_demo_yaml_builds() -> None:
    from pathlib import Path

    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundles" / "msam_kits19" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "demo.yaml")])
    from_config = parser.get_parsed_content("network_def")
    preset = build_msam("demo", click_stamp=from_config.click_stamp)
    assert {k: v.shape for k, v in from_config.state_dict().items()} == {
        k: v.shape for k, v in preset.state_dict().items()
    }


def test_build_parts_and_msam_share_their_defaults() -> None:
    """MSAM's keyword arguments are the contract; build_parts repeats the size ones, so their defaults must agree."""
    import inspect

    parts = inspect.signature(build_parts).parameters
    model = inspect.signature(MSAM.__init__).parameters
    assert set(parts) <= set(model)
    assert {k: p.default for k, p in parts.items()} == {k: model[k].default for k in parts}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(encoder_depth=2.0), "encoder_depth must be int"),
        (dict(use_mea=1), "use_mea must be bool"),
        (dict(lora_rank=True), "lora_rank must be int"),
        (dict(mea_mlp_ratio="4"), "mea_mlp_ratio must be int or float"),
        (dict(click_stamp=None), "click_stamp must be int or float"),
    ],
)
def test_argument_types_are_checked_against_the_signature(kwargs: dict, message: str) -> None:
    """Types come from the annotations of ``MSAM`` / ``build_parts`` (no separate list of names to keep in step)."""
    with pytest.raises(TypeError, match=message):
        MSAM(image_size=32, patch_size=8, encoder_embed_dim=16, **kwargs)
    if "lora_rank" not in kwargs and "click_stamp" not in kwargs:
        with pytest.raises(TypeError, match=message):
            build_parts(image_size=32, patch_size=8, encoder_embed_dim=16, **kwargs)
