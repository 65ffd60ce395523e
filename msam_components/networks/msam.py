"""The M-SAM model: SAM-Med3D (encoder, prompt encoder, decoder) plus LoRA on the encoder and the Mask-Enhanced Adapter."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_type
from .click_prompt import stamp_clicks
from .compute_paths import UsesComputePath, compute_path, set_attention_impl
from .image_encoder import ImageEncoderViT3D
from .image_state import ImageState
from .lora import LoRAQKV
from .mask_decoder import MaskDecoder3D
from .mea import MaskEnhancedAdapter
from .prompt_encoder import PromptEncoder3D

ENCODER_TRAINABLE_MODES = ("lora", "frozen", "full")
_CHECKED = {"int": int, "float": (int, float), "bool": bool}  # by annotation name: a string or a class


def check_arguments(fn: Callable, values: dict[str, object]) -> None:
    """``TypeError`` for any of ``values`` that does not match the ``int`` / ``float`` / ``bool`` annotation of
    ``fn``'s parameter of that name (``True`` is no int); the signature is the one list of what is checked."""
    for name, parameter in inspect.signature(fn).parameters.items():
        annotation = getattr(parameter.annotation, "__name__", parameter.annotation)
        if name in values and annotation in _CHECKED:
            check_type(name, values[name], _CHECKED[annotation])


# click_fn(iteration, previous full-resolution logits or None) -> (points [B, N, 3], point_labels [B, N])
ClickFn = Callable[[int, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]
# feedback_fn(iteration, low-res mask prompt [B, 1, d, h, w]) -> the mask prompt to use (the same object if unchanged)
FeedbackFn = Callable[[int, torch.Tensor], torch.Tensor]


def _check_click_stamp(click_stamp: float, click_stamp_sigma: float) -> None:
    """Refuse a negative stamp height or a non-positive width, naming both values."""
    check_type("click_stamp", click_stamp, (int, float))
    check_type("click_stamp_sigma", click_stamp_sigma, (int, float))
    if click_stamp < 0 or click_stamp_sigma <= 0:
        raise ValueError(f"click_stamp must be >= 0 and click_stamp_sigma > 0, got {click_stamp}, {click_stamp_sigma}")


@dataclass
class MSAMParts:
    """The modules an :class:`MSAM` is composed of; ``mea`` is None for the SAM-Med3D decoder input (no MEA)."""

    image_encoder: ImageEncoderViT3D
    prompt_encoder: PromptEncoder3D
    mask_decoder: MaskDecoder3D
    mea: MaskEnhancedAdapter | None = None


def build_parts(
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
    rel_pos_layout: str = "sam-med3d",
    attention_impl: str = "fast",
) -> MSAMParts:
    """Build the image encoder, prompt encoder, mask decoder and (``use_mea``) MEA of the given sizes, in that order
    (the order of their random initialisation); the defaults are the paper's model."""
    check_arguments(build_parts, locals())
    grid = image_size // patch_size
    embedding_size = (grid, grid, grid)
    return MSAMParts(
        image_encoder=ImageEncoderViT3D(
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
            attention_impl=attention_impl,
        ),
        prompt_encoder=PromptEncoder3D(
            embed_dim=prompt_embed_dim,
            image_embedding_size=embedding_size,
            input_image_size=(image_size,) * 3,
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder3D(
            transformer_dim=prompt_embed_dim,
            num_multimask_outputs=num_multimask_outputs,
            transformer_depth=decoder_transformer_depth,
            transformer_num_heads=decoder_num_heads,
            transformer_mlp_dim=decoder_mlp_dim,
            attention_downsample_rate=decoder_attention_downsample_rate,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
            attention_impl=attention_impl,
        ),
        mea=(
            MaskEnhancedAdapter(
                prompt_embed_dim,
                mea_num_heads,
                mea_mlp_ratio,
                embedding_size,
                mea_num_blocks,
                rel_pos_layout=rel_pos_layout,
                attention_impl=attention_impl,
            )
            if use_mea
            else None
        ),
    )


class MSAM(UsesComputePath, nn.Module):
    """M-SAM for 3-D lesion segmentation from clicks; the default arguments build the paper's full-size model.

    Defaults: ViT-B encoder (768 wide, 12 blocks, 12 heads, global blocks 2/5/8/11, window 14), prompt dim 384, 128^3
    input, MEA on, LoRA rank 16 on q and v: 118,244,080 parameters of which 25,319,152 (21.41 %) are trainable. The
    released code uses ``lora_rank=4`` (117,801,712 / 24,876,784). Ablations (paper Table 3): ``use_mea=False`` is
    SAM-Med3D's decoder input ``image + dense``; ``lora_rank=0, encoder_trainable="frozen"`` freezes the encoder;
    ``lora_rank=0, encoder_trainable="full"`` fine-tunes it entirely. ``rel_pos_layout="sam-med3d"`` keeps the
    upstream broadcasting of the relative-position terms that the pretrained weights expect; ``"decomposed"`` is the
    textbook MViTv2 form (for training from scratch only). ``attention_impl`` picks the compute path of every part
    (``compute_paths.py``, the one place both live): ``"fast"`` (default) computes the encoder and MEA attention
    exactly but without materialising the window padding, via ``scaled_dot_product_attention`` (about 10x faster
    encoder on CPU), and takes the exact fast per-click steps (the MEA's mask-branch convolution on the factored mask
    embedding, a fused, selected-masks-only decoder upscaling, a separable upsampling of the logits); ``"reference"``
    is the straightforward computation all of them are tested against. Neither changes parameters;
    :func:`compute_paths.set_attention_impl` switches a built model.

    ``click_stamp > 0`` also writes each click into the low-res mask prompt (``click_prompt.py``; parameter-free, off
    in the upstream model), so a model trained from scratch cannot ignore clicks in favour of its fed-back mask.

    Contract: :meth:`encode` runs once per image, :meth:`decode` once per click, :meth:`forward` does both.
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        check_arguments(MSAM.__init__, locals())
        self.path = compute_path(attention_impl)
        _check_click_stamp(click_stamp, click_stamp_sigma)  # before the (slow, full-size) modules are built
        given = locals()
        parts = build_parts(**{name: given[name] for name in inspect.signature(build_parts).parameters})
        self._assemble(parts, lora_rank, encoder_trainable, click_stamp, click_stamp_sigma)

    @classmethod
    def from_parts(
        cls,
        parts: MSAMParts,
        lora_rank: int = 0,
        encoder_trainable: str = "full",
        attention_impl: str = "fast",
        click_stamp: float = 0.0,
        click_stamp_sigma: float = 1.0,
    ) -> MSAM:
        """An M-SAM composed of given modules (as segment-anything's ``Sam(image_encoder, prompt_encoder,
        mask_decoder)``): the sizes are read from the prompt encoder; LoRA of ``lora_rank`` is added to the encoder."""
        check_type("lora_rank", lora_rank, int)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.path = compute_path(attention_impl)
        model._assemble(parts, lora_rank, encoder_trainable, click_stamp, click_stamp_sigma)
        return model

    def _assemble(
        self, parts: MSAMParts, lora_rank: int, encoder_trainable: str, click_stamp: float, click_stamp_sigma: float
    ) -> None:
        """Hold the parts (in this order: the parameter names are the checkpoint format), add LoRA, set what trains."""
        _check_click_stamp(click_stamp, click_stamp_sigma)
        self.click_stamp, self.click_stamp_sigma = float(click_stamp), float(click_stamp_sigma)
        self.image_size = int(parts.prompt_encoder.input_image_size[0])
        self.embedding_size = tuple(parts.prompt_encoder.image_embedding_size)
        self.low_res_size = tuple(4 * g for g in self.embedding_size)
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder
        self.mea = parts.mea
        set_attention_impl(self, self.path.name)  # given parts may have been built on the other path
        self.lora_rank = lora_rank
        if lora_rank > 0:
            for block in self.image_encoder.blocks:
                block.attn.qkv = LoRAQKV(block.attn.qkv, lora_rank)
        set_encoder_trainable(self, encoder_trainable)

    @property
    def use_mea(self) -> bool:
        return self.mea is not None

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, 384, 8, 8, 8]`` of ``[B, 1, 128, 128, 128]`` input; compute once per image."""
        return self.image_encoder(image)

    def prepare_embedding(self, embedding: torch.Tensor) -> ImageState:
        """Per-image state for :meth:`decode`: :meth:`prepare_image_state` plus, where the compute path factors the
        mask embedding, the MEA's composed mask kernel (parameters only; per image keeps it in step with training)."""
        state = self.prepare_image_state(embedding)
        if self.mea is not None and self.path.factored_mask:
            last = self.prompt_encoder.mask_downscaling[-1]
            state.mask_kernel = self.mea.mask_conv_kernel(last.weight.flatten(1), last.bias)
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
        factored = self.mea is not None and self.path.factored_mask  # 16 channels instead of 384
        sparse, dense = self.prompt_encoder(points, point_labels, low_res_mask, batch, factored=factored)
        if self.mea is not None:
            prepared = (state.mea_image, state.mea_image_conv)
            kernel = state.mask_kernel if low_res_mask is not None else None
            image_tokens = self.mea(image_embedding, dense, prepared=prepared, mask_kernel=kernel)
        else:
            image_tokens = image_embedding + dense
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
    ) -> torch.Tensor:
        """The iterative click loop: encode once, then ``num_clicks`` decode steps fed back their own low-res logits.

        ``click_fn(i, logits)`` returns the prompt for step ``i`` given the previous step's full-resolution logits
        (``None`` at step 0, where the mask prompt is all zeros as in M-SAM's trainer). The raw low-res logits are fed
        back without sigmoid or threshold and, unless ``detach_feedback``, with gradients (full backpropagation through
        the clicks, as the reference). ``feedback_fn(i, low_res)``, if given, may replace the mask prompt before click
        ``i`` is drawn (training recipes: start from an imperfect mask, drop the fed-back mask); the click is then drawn
        from the replaced mask's errors. Returns the logits after every click, ``[B, num_clicks, 128, 128, 128]``.
        """
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        state = self.prepare_embedding(self.encode(image))
        low_res = image.new_zeros(image.shape[0], 1, *self.low_res_size)
        full, outputs = None, []
        for i in range(num_clicks):
            if feedback_fn is not None:
                fed = feedback_fn(i, low_res)
                if fed is not low_res:
                    low_res, full = fed, self.upsample(fed)
            points, labels = click_fn(i, None if full is None else full.detach())
            low_res = self.decode(state, points, labels, low_res.detach() if detach_feedback else low_res)
            full = self.upsample(low_res)
            outputs.append(full)
        return torch.cat(outputs, dim=1)

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
    ) -> torch.Tensor:
        """Full-resolution logits ``[B, 1, 128, 128, 128]``; a bare image (no prompt at all) also works.

        With ``click_fn`` the whole click loop of :meth:`refine` runs in this one call (so DistributedDataParallel sees
        one forward pass per step) and the result is ``[B, num_clicks, 128, 128, 128]``.
        """
        if click_fn is not None:
            return self.refine(image, click_fn, num_clicks, detach_feedback, feedback_fn)
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
