"""Build M-SAM from sizes: the one place that knows how the parts are made, LoRA added and the compute path chosen.

``build_msam()`` is the paper's model; ``build_msam("demo", click_stamp=1.0)`` a size preset with overrides of any
size argument of :func:`msam_of_sizes`. A bundle's ``network_def`` targets ``build_msam`` with a ``preset`` and only
the values it changes. :class:`msam.MSAM` itself is only composed of the parts this builds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

from ..checks import as_bool, check_type
from .compute_paths import compute_path, set_attention_impl
from .image_encoder import ImageEncoderViT3D
from .lora import LoRAQKV
from .mask_decoder import MaskDecoder3D
from .mea import MaskEnhancedAdapter
from .msam import MSAM, check_click_stamp, set_encoder_trainable
from .prompt_encoder import PromptEncoder3D

__all__ = ["PRESETS", "add_lora", "build_msam", "check_arguments", "msam_of_sizes"]

_CHECKED = {"int": int, "float": (int, float), "bool": bool}  # by annotation name: a string or a class


def check_arguments(fn: Callable, values: dict[str, object]) -> None:
    """``TypeError`` for any of ``values`` that does not match the ``int`` / ``float`` / ``bool`` annotation of
    ``fn``'s parameter of that name (``True`` is no int); the signature is the one list of what is checked."""
    for name, parameter in inspect.signature(fn).parameters.items():
        annotation = getattr(parameter.annotation, "__name__", parameter.annotation)
        if name in values and annotation in _CHECKED:
            check_type(name, values[name], _CHECKED[annotation])


PRESETS = MappingProxyType(
    {
        # the paper's model (MICCAI 2024): ViT-B encoder, LoRA rank 16, MEA; 118,244,080 parameters
        "paper": {},
        # SAM-Med3D itself (no MEA, no LoRA), fine-tuned whole: the paper's baseline
        "sam-med3d": {"use_mea": False, "lora_rank": 0, "encoder_trainable": "full"},
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
    """An :class:`MSAM` of a named size preset (``PRESETS``), with keyword overrides of any :func:`msam_of_sizes`
    argument; an unknown preset or argument is refused by name. ``use_mea`` may be given as a config or command line
    spells it (``--use_mea false``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown M-SAM preset {preset!r}; choose from {sorted(PRESETS)}")
    known = inspect.signature(msam_of_sizes).parameters
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"build_msam got unknown argument(s) {unknown}; the sizes are {list(known)}")
    if isinstance(overrides.get("use_mea"), str):  # "--use_mea false"; other non-bools are refused by type
        overrides["use_mea"] = as_bool(overrides["use_mea"], "use_mea")
    return msam_of_sizes(**{**PRESETS[preset], **overrides})


def add_lora(image_encoder: ImageEncoderViT3D, rank: int) -> ImageEncoderViT3D:
    """Wrap every encoder block's fused ``qkv`` in :class:`LoRAQKV` of ``rank`` (in place; returns the encoder)."""
    for block in image_encoder.blocks:
        block.attn.qkv = LoRAQKV(block.attn.qkv, rank)
    return image_encoder


def msam_of_sizes(
    image_size: int = 128,
    patch_size: int = 16,
    in_channels: int = 1,
    encoder_embed_dim: int = 768,
    encoder_depth: int = 12,
    encoder_num_heads: int = 12,
    encoder_mlp_ratio: float = 4.0,
    encoder_global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    encoder_window_size: int = 14,
    prompt_embed_dim: int = 384,
    mask_in_chans: int = 16,
    decoder_transformer_depth: int = 2,
    decoder_num_heads: int = 8,
    decoder_mlp_dim: int = 2048,
    decoder_attention_downsample_rate: int = 2,
    num_multimask_outputs: int = 3,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
    use_mea: bool = True,
    mea_num_heads: int = 6,
    mea_mlp_ratio: float = 4.0,
    mea_num_blocks: int = 1,
    lora_rank: int = 16,
    encoder_trainable: str = "lora",
    rel_pos_layout: str = "sam-med3d",
    attention_impl: str = "fast",
    click_stamp: float = 0.0,
    click_stamp_sigma: float = 1.0,
) -> MSAM:
    """The paper's model by default (118,244,080 parameters, 25,319,152 trainable with LoRA rank 16 on q and v).

    The parts are built in the order image encoder, prompt encoder, mask decoder, MEA, then LoRA (the order of their
    random initialisation, so a seed gives the same model as before). ``use_mea=False`` is SAM-Med3D's decoder input;
    ``lora_rank=0`` with ``encoder_trainable="frozen"`` or ``"full"`` the paper's other ablations (Table 3).
    ``rel_pos_layout="sam-med3d"`` keeps the upstream relative-position broadcasting the pretrained weights expect
    (``"decomposed"``: the textbook MViTv2 form, for training from scratch only). ``attention_impl`` picks the compute
    path of every part (``compute_paths.py``): ``"fast"`` (same numbers, about 10x faster encoder on CPU) or
    ``"reference"`` (the straightforward computation the fast one is tested against).
    """
    check_arguments(msam_of_sizes, locals())
    path = compute_path(attention_impl)  # clear errors before the (slow, full-size) modules are built
    check_click_stamp(click_stamp, click_stamp_sigma)
    grid = image_size // patch_size
    embedding_size = (grid, grid, grid)
    image_encoder = ImageEncoderViT3D(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        embed_dim=encoder_embed_dim,
        depth=encoder_depth,
        num_heads=encoder_num_heads,
        mlp_ratio=encoder_mlp_ratio,
        out_chans=prompt_embed_dim,
        global_attn_indexes=encoder_global_attn_indexes,
        window_size=encoder_window_size,
        rel_pos_layout=rel_pos_layout,
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=prompt_embed_dim,
        image_embedding_size=embedding_size,
        input_image_size=(image_size,) * 3,
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = MaskDecoder3D(
        transformer_dim=prompt_embed_dim,
        num_multimask_outputs=num_multimask_outputs,
        transformer_depth=decoder_transformer_depth,
        transformer_num_heads=decoder_num_heads,
        transformer_mlp_dim=decoder_mlp_dim,
        attention_downsample_rate=decoder_attention_downsample_rate,
        iou_head_depth=iou_head_depth,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    mea = (
        MaskEnhancedAdapter(
            prompt_embed_dim,
            mea_num_heads,
            mea_mlp_ratio,
            embedding_size,
            mea_num_blocks,
            rel_pos_layout=rel_pos_layout,
        )
        if use_mea
        else None
    )
    if lora_rank > 0:
        add_lora(image_encoder, lora_rank)
    model = MSAM(image_encoder, prompt_encoder, mask_decoder, mea, click_stamp, click_stamp_sigma)
    set_attention_impl(model, path.name)
    set_encoder_trainable(model, encoder_trainable)
    return model
