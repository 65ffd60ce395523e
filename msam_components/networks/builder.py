"""Size presets of M-SAM and a builder, so a model is named by what it is rather than by 26 keyword arguments.

``MSAM()`` stays the paper's model and every size stays a keyword argument (the bundles' flat ``network_def``); the
presets only collect the combinations this project uses. ``build_msam("tiny", lora_rank=0)`` is a preset with
overrides.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .msam import MSAM

__all__ = ["PRESETS", "build_msam"]

PRESETS = MappingProxyType(
    {
        # the paper's model (MICCAI 2024): ViT-B encoder, LoRA rank 16, MEA; 118,244,080 parameters
        "paper": {},
        # the authors' released code: LoRA rank 4 (117,801,712 parameters)
        "released": {"lora_rank": 4},
        # the CPU demo's size (configs/demo.yaml): 64^3 at 2 mm, trained from scratch
        "demo": {
            "image_size": 64,
            "patch_size": 8,
            "encoder_embed_dim": 96,
            "encoder_depth": 2,
            "encoder_num_heads": 4,
            "encoder_global_attn_indexes": (1,),
            "encoder_window_size": 8,
            "prompt_embed_dim": 96,
            "decoder_mlp_dim": 192,
            "iou_head_hidden_dim": 64,
            "lora_rank": 0,
            "encoder_trainable": "full",
        },
        # a few-second model for tests and smoke runs
        "tiny": {
            "image_size": 32,
            "patch_size": 4,
            "encoder_embed_dim": 24,
            "encoder_depth": 2,
            "encoder_num_heads": 2,
            "encoder_global_attn_indexes": (1,),
            "encoder_window_size": 8,
            "prompt_embed_dim": 24,
            "mask_in_chans": 8,
            "decoder_num_heads": 4,
            "decoder_mlp_dim": 48,
            "iou_head_hidden_dim": 16,
            "lora_rank": 2,
        },
    }
)


def build_msam(preset: str = "paper", **overrides: Any) -> MSAM:
    """An :class:`MSAM` of a named size preset (``PRESETS``), with keyword overrides of any ``MSAM`` argument."""
    if preset not in PRESETS:
        raise ValueError(f"unknown M-SAM preset {preset!r}; choose from {sorted(PRESETS)}")
    return MSAM(**{**PRESETS[preset], **overrides})
