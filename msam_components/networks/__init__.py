"""M-SAM networks: image encoder, prompt encoder, mask decoder, MEA, LoRA, the model and checkpoint import."""

from .builder import PRESETS, add_lora, build_msam, msam_of_sizes
from .compute_paths import ATTENTION_IMPLS, ComputePath, set_attention_impl
from .image_encoder import ImageEncoderViT3D
from .image_state import ImageState
from .lora import LoRAQKV
from .mask_decoder import MaskDecoder3D
from .mask_input import MaskInput
from .mea import MaskEnhancedAdapter
from .msam import MSAM, count_parameters, msam_parameter_groups, set_encoder_trainable
from .pretrained import CheckpointError, LoadReport, load_pretrained, load_pretrained_or_warn, read_checkpoint
from .prompt_encoder import PromptEncoder3D

__all__ = [
    "MSAM",
    "PRESETS",
    "add_lora",
    "build_msam",
    "msam_of_sizes",
    "CheckpointError",
    "LoadReport",
    "load_pretrained",
    "load_pretrained_or_warn",
    "read_checkpoint",
    "ATTENTION_IMPLS",
    "ComputePath",
    "ImageEncoderViT3D",
    "ImageState",
    "LoRAQKV",
    "MaskDecoder3D",
    "MaskInput",
    "MaskEnhancedAdapter",
    "PromptEncoder3D",
    "count_parameters",
    "msam_parameter_groups",
    "set_attention_impl",
    "set_encoder_trainable",
]
