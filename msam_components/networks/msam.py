"""The M-SAM model: SAM-Med3D (encoder, prompt encoder, decoder) plus LoRA on the encoder and the Mask-Enhanced Adapter."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_type
from .click_loop import ClickFn, ClickLoop, FeedbackFn
from .click_prompt import stamp_clicks
from .compute_paths import UsesComputePath
from .image_encoder import ImageEncoderViT3D
from .image_state import ImageState
from .lora import LoRAQKV
from .mask_decoder import MaskDecoder3D
from .mea import MaskEnhancedAdapter
from .prompt_encoder import PromptEncoder3D

ENCODER_TRAINABLE_MODES = ("lora", "frozen", "full")


def check_click_stamp(click_stamp: float, click_stamp_sigma: float) -> None:
    """Refuse a negative stamp height or a non-positive width, naming both values."""
    check_type("click_stamp", click_stamp, (int, float))
    check_type("click_stamp_sigma", click_stamp_sigma, (int, float))
    if click_stamp < 0 or click_stamp_sigma <= 0:
        raise ValueError(f"click_stamp must be >= 0 and click_stamp_sigma > 0, got {click_stamp}, {click_stamp_sigma}")


class MSAM(UsesComputePath, nn.Module):
    """M-SAM for 3-D lesion segmentation from clicks, composed of its parts (as segment-anything's ``Sam``).

    ``image_encoder`` (SAM-Med3D's ViT, with LoRA where the builder added it), ``prompt_encoder``, ``mask_decoder`` and
    ``mea`` (the Mask-Enhanced Adapter; None gives SAM-Med3D's decoder input ``image + dense``). The sizes are read
    from the prompt encoder. :func:`builder.build_msam` builds the paper's model and the project's presets (sizes,
    LoRA, freezing scheme, compute path); this class holds no construction logic, and its attribute names are the
    checkpoint format.

    ``click_stamp > 0`` also writes each click into the low-res mask prompt (``click_prompt.py``; parameter-free, off
    in the upstream model), so a model trained from scratch cannot ignore clicks in favour of its fed-back mask.

    The compute path (``compute_paths.py``: ``"fast"``, the default, or ``"reference"``) is the parts' and is switched
    for all of them at once by :func:`compute_paths.set_attention_impl`.

    Contract: :meth:`encode` runs once per image, :meth:`prepare_embedding` once per image, :meth:`decode` once per
    click; :meth:`forward` does all three.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        mea: MaskEnhancedAdapter | None = None,
        click_stamp: float = 0.0,
        click_stamp_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        check_click_stamp(click_stamp, click_stamp_sigma)
        self.click_stamp, self.click_stamp_sigma = float(click_stamp), float(click_stamp_sigma)
        self.image_size = int(prompt_encoder.input_image_size[0])
        self.embedding_size = tuple(prompt_encoder.image_embedding_size)
        self.low_res_size = tuple(4 * g for g in self.embedding_size)
        # in this order: the parameter names and their order are the checkpoint format
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.mea = mea
        self.encoder_trainable = "full"  # what nn.Module gives; set_encoder_trainable records another scheme

    @property
    def lora_rank(self) -> int:
        """The rank of the encoder's LoRA (0 without LoRA)."""
        ranks = {block.attn.qkv.rank for block in self.image_encoder.blocks if isinstance(block.attn.qkv, LoRAQKV)}
        return ranks.pop() if len(ranks) == 1 else 0

    @property
    def use_mea(self) -> bool:
        return self.mea is not None

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, 384, 8, 8, 8]`` of ``[B, 1, 128, 128, 128]`` input; compute once per image."""
        return self.image_encoder(image)

    def prepare_embedding(self, embedding: torch.Tensor) -> ImageState:
        """Per-image state for :meth:`decode`: :meth:`prepare_image_state` plus what the compute path reuses for every
        click of the image (the fast path's composed MEA mask kernel; parameters only, so per image keeps it in step
        with training)."""
        state = self.prepare_image_state(embedding)
        if self.mea is not None:
            state.mask_kernel = self.path.mea_mask_kernel(self.mea, self.prompt_encoder)
        return state

    def prepare_image_state(self, embedding: torch.Tensor) -> ImageState:
        """The embedding plus the MEA's image-only stage (so no click recomputes it)."""
        if self.mea is None:
            return ImageState(embedding)
        return ImageState(embedding, *self.mea.prepare_image(embedding))

    def decode(
        self,
        embedding: torch.Tensor | ImageState,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        low_res_mask: torch.Tensor | None = None,
        multimask_output: bool = False,
        return_iou: bool = False,
        valid_points: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits ``[B, 1, 32, 32, 32]`` for clicks ``points`` ``[B, N, 3]`` (voxel ``(d, h, w)`` in the 128^3 input).

        ``point_labels`` ``[B, N]``: 1 positive, 0 negative, -1 padding. ``low_res_mask`` is the previous iteration's raw
        logits (``None`` means no mask prompt). ``embedding`` is :meth:`encode`'s output or :meth:`prepare_embedding`'s.
        A label -1 point is SAM's "not a point" token and still takes part in the decoder's attention; ``valid_points``
        ``[B, N]`` bool leaves the False points out of it entirely, so a prompt padded to a fixed number of clicks (for
        static shapes, e.g. CUDA graphs) gives the same logits as the unpadded one.
        """
        state = embedding if isinstance(embedding, ImageState) else self.prepare_embedding(embedding)
        image_embedding = state.embedding
        batch = image_embedding.shape[0]
        if points is not None:
            if points.ndim != 3 or points.shape[0] != batch or points.shape[-1] != 3:
                raise ValueError(f"points must be [B={batch}, N, 3] voxel indices, got {list(points.shape)}")
            if point_labels is None or tuple(point_labels.shape) != tuple(points.shape[:2]):
                got = None if point_labels is None else list(point_labels.shape)
                raise ValueError(f"point_labels must be [B, N] = {list(points.shape[:2])}, got {got}")
        if valid_points is not None and (points is None or tuple(valid_points.shape) != tuple(points.shape[:2])):
            want = None if points is None else list(points.shape[:2])
            raise ValueError(f"valid_points must be [B, N] = {want} with points, got {list(valid_points.shape)}")
        if self.click_stamp > 0 and points is not None:
            base = low_res_mask if low_res_mask is not None else image_embedding.new_zeros(batch, 1, *self.low_res_size)
            low_res_mask = stamp_clicks(
                base, points, point_labels, self.image_size, self.click_stamp, self.click_stamp_sigma
            )
        sparse = self.prompt_encoder.sparse_embedding(points, point_labels, batch)
        if self.mea is not None:
            kernel = state.mask_kernel if low_res_mask is not None else None
            mask_input = self.path.mea_mask_input(self.mea, self.prompt_encoder, low_res_mask, batch, kernel)
            image_tokens = self.mea(image_embedding, mask_input, prepared=(state.mea_image, state.mea_image_conv))
        else:
            image_tokens = image_embedding + self.prompt_encoder.dense_embedding(low_res_mask, batch)
        bias = None
        if valid_points is not None:  # 0 for clicks that count, -inf for padding; the appended SAM token counts
            bias = sparse.new_zeros(valid_points.shape).masked_fill(~valid_points, float("-inf"))
            bias = torch.cat([bias, sparse.new_zeros(batch, 1)], dim=1)
        dense_pe = self.prompt_encoder.get_dense_pe()
        masks, iou = self.mask_decoder(image_tokens, dense_pe, sparse, multimask_output, sparse_bias=bias)
        return (masks, iou) if return_iou else masks

    def upsample(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Trilinear (``align_corners=False``) upsampling of low-res logits to the input resolution.

        The fast path computes it as three 1-D interpolation matmuls (``interpolation.py``): same values, and a
        backward about 10x cheaper on CPU than ``F.interpolate``'s, which matters with 10 clicks per training step.
        """
        return self.path.upsample(low_res_logits, (self.image_size,) * 3)

    def refine(
        self,
        image: torch.Tensor,
        click_fn: ClickFn,
        num_clicks: int,
        detach_feedback: bool = False,
        feedback_fn: FeedbackFn | None = None,
        pass_all_clicks: bool = False,
    ) -> torch.Tensor:
        """Encode once, then run the click loop (:class:`~msam_components.networks.click_loop.ClickLoop`) for
        ``num_clicks`` steps from an empty mask prompt (as M-SAM's trainer); returns the logits after every click,
        ``[B, num_clicks, 128, 128, 128]``.

        ``click_fn(i, logits)`` gives step ``i``'s new click from the previous step's full-resolution logits (``None`` at
        step 0); each decode gets that click alone or, with ``pass_all_clicks``, every click so far. The raw low-res
        logits are fed back without sigmoid or threshold and, unless ``detach_feedback``, with gradients (full
        backpropagation through the clicks, as the reference). ``feedback_fn(i, low_res)``, if given, may replace the
        mask prompt before click ``i`` is drawn (training recipes); the click is then drawn from the replaced mask.
        """
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        state = self.prepare_embedding(self.encode(image))
        low_res = image.new_zeros(image.shape[0], 1, *self.low_res_size)
        loop = ClickLoop(pass_all_clicks, detach_feedback)
        return torch.cat(loop.run(self, state, click_fn, num_clicks, low_res, feedback_fn), dim=1)

    def forward(
        self,
        image: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        low_res_mask: torch.Tensor | None = None,
        click_fn: ClickFn | None = None,
        num_clicks: int = 1,
        detach_feedback: bool = False,
        feedback_fn: FeedbackFn | None = None,
        pass_all_clicks: bool = False,
    ) -> torch.Tensor:
        """Full-resolution logits ``[B, 1, 128, 128, 128]``; a bare image (no prompt at all) also works.

        With ``click_fn`` the whole click loop of :meth:`refine` runs in this one call (so DistributedDataParallel sees
        one forward pass per step) and the result is ``[B, num_clicks, 128, 128, 128]``.
        """
        if click_fn is not None:
            return self.refine(image, click_fn, num_clicks, detach_feedback, feedback_fn, pass_all_clicks)
        return self.upsample(self.decode(self.encode(image), points, point_labels, low_res_mask))


def set_encoder_trainable(model: MSAM, mode: str) -> None:
    """Apply a freezing scheme: ``"lora"`` (only LoRA in the encoder), ``"frozen"`` or ``"full"``; the rest trains."""
    if mode not in ENCODER_TRAINABLE_MODES:
        raise ValueError(f"encoder_trainable must be one of {ENCODER_TRAINABLE_MODES}, got {mode!r}")
    if mode == "lora" and model.lora_rank <= 0:
        raise ValueError("encoder_trainable='lora' needs lora_rank > 0 (use 'frozen' or 'full' without LoRA)")
    for name, param in model.named_parameters():
        if name.startswith("image_encoder."):
            is_lora = ".linear_a_" in name or ".linear_b_" in name
            param.requires_grad_(mode == "full" or (mode == "lora" and is_lora))
        else:
            param.requires_grad_(True)
    model.encoder_trainable = mode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def msam_parameter_groups(
    model: MSAM, lr: float = 8e-4, prompt_decoder_lr_scale: float = 0.1
) -> list[dict[str, object]]:
    """AdamW groups as in M-SAM: encoder (LoRA) and MEA at ``lr``; prompt encoder and mask decoder at ``lr * 0.1``."""
    main, scaled = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (scaled if name.startswith(("prompt_encoder.", "mask_decoder.")) else main).append(param)
    groups = [{"params": main, "lr": lr}, {"params": scaled, "lr": lr * prompt_decoder_lr_scale}]
    return [g for g in groups if g["params"]]
