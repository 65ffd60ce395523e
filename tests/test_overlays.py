"""Config overlays compose: every stack the bundle docs show builds the network the top-level keys ask for.

An overlay that replaced ``network_def`` with literal values would silently win over a later ``use_mea: false`` or a
command-line ``--lora_rank 4``; these tests build the network of each stack and read the settings back from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("msam_kits19", "msam_brats21")

# (config files after the first, command-line overrides) as the bundle README and the top-level README use them
STACKS = [
    (["train.yaml"], {}),
    (["train.yaml", "ablation_without_mea.yaml"], {}),
    (["train.yaml", "ablation_full_finetune.yaml"], {}),
    (["train.yaml", "ablation_frozen_encoder.yaml"], {}),
    (["train.yaml", "paper_protocol.yaml"], {}),
    (["train.yaml", "demo.yaml"], {}),
    (["train.yaml", "demo.yaml", "ablation_without_mea.yaml"], {}),
    (["train.yaml", "ablation_without_mea.yaml", "demo.yaml"], {}),
    (["train.yaml", "demo.yaml", "paper_protocol.yaml"], {}),
    (["train.yaml", "demo.yaml"], {"lora_rank": 4, "encoder_trainable": "lora"}),
    (["train.yaml", "demo.yaml"], {"use_mea": False, "click_stamp": 2.0}),
    (["train.yaml", "evaluate.yaml", "demo.yaml"], {}),
    (["inference.yaml", "demo.yaml"], {}),
    (["train.yaml", "multi_gpu_train.yaml", "demo.yaml"], {}),
]


def _parser(bundle: str, files: list[str], overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / name) for name in files])
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("files,overrides", STACKS, ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
def test_every_documented_stack_builds_the_network_its_keys_ask_for(bundle: str, files: list, overrides: dict) -> None:
    parser = _parser(bundle, files, overrides)
    want = {key: parser.get_parsed_content(key) for key in ("use_mea", "lora_rank", "encoder_trainable", "click_stamp")}
    image_size = parser.get_parsed_content("image_size")
    net = parser.get_parsed_content("network_def")
    assert net.use_mea == bool(want["use_mea"])
    assert net.lora_rank == want["lora_rank"]
    assert net.encoder_trainable == want["encoder_trainable"]
    assert net.click_stamp == float(want["click_stamp"])
    assert net.image_size == image_size
    lora = [n for n, _ in net.named_parameters() if ".linear_a_" in n]
    assert bool(lora) == (want["lora_rank"] > 0)
    encoder = {n: p.requires_grad for n, p in net.named_parameters() if n.startswith("image_encoder.")}
    trainable = {n for n, grad in encoder.items() if grad}
    expected = {"full": set(encoder), "frozen": set(), "lora": {n for n in encoder if ".linear_" in n}}
    assert trainable == expected[want["encoder_trainable"]]
    if "demo.yaml" in files:  # the demo's sizes reach the network whatever else is stacked
        assert net.embedding_size == (image_size // 8,) * 3
        assert net.image_encoder.blocks[0].attn.num_heads == 4 and len(net.image_encoder.blocks) == 2
    else:
        assert len(net.image_encoder.blocks) == 12


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_demo_overlay_only_sets_keys_it_names(bundle: str) -> None:
    """demo.yaml names the demo size preset, never replacing ``network_def`` or restating its sizes one by one."""
    demo = ConfigParser.load_config_file(str(REPO / "bundles" / bundle / "configs" / "demo.yaml"))
    assert "network_def" not in demo and demo["network_preset"] == "demo"
    assert not any(key.startswith("network_def#") for key in demo)


@pytest.mark.parametrize("rank", [0, 1])
def test_multi_gpu_handlers_are_chosen_by_type_not_position(rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a handler added in front of each list, rank 0 keeps everything and other ranks drop only the loggers."""
    import torch.distributed

    import msam_components.engines.run_checks  # noqa: F401  (the expression below reaches it as an attribute)

    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)
    parser = _parser("msam_kits19", ["train.yaml", "multi_gpu_train.yaml"], {})
    parser["train#handlers"] = (
        "$[ignite.handlers.TerminateOnNan(), msam_components.failure_report.FailureReport(), monai.handlers.StatsHandler(),"
        " msam_components.engines.run_checks.RequireLesionCases()]"
    )
    parser["validate#handlers"] = (
        "$[ignite.handlers.TerminateOnNan(), monai.handlers.StatsHandler(),"
        " msam_components.engines.ClickMetricsHandler(output_dir='.'), msam_components.failure_report.FailureReport(),"
        " msam_components.engines.LesionMetricsHandler(output_dir=None)]"
    )
    train = [type(h).__name__ for h in parser.get_parsed_content("train#trainer#train_handlers")]
    val = [type(h).__name__ for h in parser.get_parsed_content("validate#evaluator#val_handlers")]
    if rank == 0:
        assert train == ["TerminateOnNan", "FailureReport", "StatsHandler", "RequireLesionCases"]
        assert val == ["TerminateOnNan", "StatsHandler", "ClickMetricsHandler", "FailureReport", "LesionMetricsHandler"]
    else:
        assert train == ["TerminateOnNan", "FailureReport", "RequireLesionCases"]
        assert val == ["ClickMetricsHandler", "FailureReport", "LesionMetricsHandler"]
