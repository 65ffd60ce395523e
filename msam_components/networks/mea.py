"""Mask-Enhanced Adapter (MEA): fuses the previous mask's embedding into the image embedding before the decoder.

The data flow follows M-SAM's released code (``BiDirectionalAttentionNetwork``), which produced the published numbers;
parameter names follow its state dict so official checkpoints load one to one. See docs in ``msam_reference.md`` §2.

Factored mask embedding (the fast compute path passes a :class:`FactoredDense`): the mask encoder ends in a 1x1
convolution from 16 channels, and the MEA's input LayerNorm only subtracts a per-voxel mean and divides by a per-voxel
scale, so the normalised mask is ``A @ [z / s, 1 / s, 1]`` per voxel with a ``[384, 18]`` matrix ``A`` built from the
parameters. The mask branch's 3x3x3 convolution is linear and zero-padded, so it equals a convolution of those 18
channels with the composed kernel ``conv1.weight @ A``: 12x fewer multiply-adds on the costliest per-click layer, with
the same result up to float rounding (tested against the plain computation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm3d, MLPBlock
from .prompt_encoder import FactoredDense
from .rel_pos_attention import RelPosSelfAttention


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3)


class MEAAttentionBlock(RelPosSelfAttention):
    """Upstream ``mea.Attention``: ``x2 = x + proj(MHSA(norm1(x)))``, returns ``mlp(norm2(x2))`` (no MLP residual).

    Despite its upstream name it is a whole transformer sub-block; the attention parameters sit at its top level
    (``qkv``, ``proj``, ``rel_pos_*``) as in the released state dict.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        input_size: tuple[int, int, int],
        norm_eps: float,
        rel_pos_layout: str = "sam-med3d",
        attention_impl: str = "reference",
    ) -> None:
        super().__init__(
            dim, num_heads, input_size, qkv_bias=True, rel_pos_layout=rel_pos_layout, attention_impl=attention_impl
        )
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-first ``[B, C, D, H, W]`` in and out."""
        x = _channels_last(x)
        x = x + super().forward(self.norm1(x))
        return _channels_first(self.mlp(self.norm2(x)))


class MutualFeatureEnhancementBlock(nn.Module):
    """One MFEB: per-branch conv stage, mutual mixing into the attention inputs, attention and MLP with Add&Norm.

    Image branch: ``I' = conv(I)``, ``Oi = LN(A(I' + I + M) + I')``, ``Oi = LN(MLP(Oi) + Oi)``; the mask branch is the
    mirror image with ``Qm = I + M' + M``. The only cross-branch connections are those two attention-input sums.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_dim: int,
        input_size: tuple[int, int, int],
        eps: float,
        rel_pos_layout: str = "sam-med3d",
        attention_impl: str = "reference",
    ) -> None:
        super().__init__()
        for branch in ("image", "prompt"):
            setattr(self, f"{branch}_conv1", nn.Conv3d(channels, channels, kernel_size=3, padding=1))
            setattr(self, f"{branch}_norm", LayerNorm3d(channels, eps))
            setattr(self, f"{branch}_conv2", nn.Conv3d(channels, channels, kernel_size=1))
            for i in (1, 2, 3):
                setattr(self, f"{branch}_addnorm{i}", LayerNorm3d(channels, eps))
            attn = MEAAttentionBlock(channels, num_heads, mlp_dim, input_size, eps, rel_pos_layout, attention_impl)
            setattr(self, f"{branch}_multiheadattn", attn)
        self.mlp1 = MLPBlock(channels, mlp_dim, act=nn.GELU)
        self.mlp2 = MLPBlock(channels, mlp_dim, act=nn.GELU)

    def image_conv_stage(self, image: torch.Tensor) -> torch.Tensor:
        """``I'``: depends on the image embedding only, so it can be computed once per image."""
        return self.image_addnorm1(
            self.image_conv2(nn.functional.gelu(self.image_norm(self.image_conv1(image)))) + image
        )

    def prompt_conv_stage(self, mask: torch.Tensor, conv1_out: torch.Tensor | None = None) -> torch.Tensor:
        """``M'``: the mask branch's local feature stage (``conv1_out``: a precomputed ``prompt_conv1(mask)``)."""
        conv1_out = self.prompt_conv1(mask) if conv1_out is None else conv1_out
        return self.prompt_addnorm1(self.prompt_conv2(nn.functional.gelu(self.prompt_norm(conv1_out))) + mask)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        image_conv: torch.Tensor | None = None,
        mask_conv1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the enhanced (image, mask) embeddings.

        ``image_conv`` may pass a cached ``image_conv_stage(image)`` and ``mask_conv1`` a ``prompt_conv1(mask)``.
        """
        image_feat = self.image_conv_stage(image) if image_conv is None else image_conv
        mask_feat = self.prompt_conv_stage(mask, mask_conv1)
        image_out = self.image_addnorm2(self.image_multiheadattn(image_feat + image + mask) + image_feat)
        image_out = self.image_addnorm3(_channels_first(self.mlp1(_channels_last(image_out))) + image_out)
        mask_out = self.prompt_addnorm2(self.prompt_multiheadattn(image + mask_feat + mask) + mask_feat)
        mask_out = self.prompt_addnorm3(_channels_first(self.mlp2(_channels_last(mask_out))) + mask_out)
        return image_out, mask_out


class MaskEnhancedAdapter(nn.Module):
    """MEA(image_embedding, mask_embedding) -> decoder image tokens, all ``[B, C, 8, 8, 8]``.

    Steps (code version): normalise both inputs; MFEB; fuse ``S = Oi + I + Om + M``; ``X = LN(A(S) + S)``;
    return ``X + MLP(X)``. ``num_blocks > 1`` chains MFEBs (an extension: the released model uses one). ``add_norm4``
    exists in the released model but is unused; it is kept so official checkpoints load strictly.
    """

    def __init__(
        self,
        channels: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        input_size: tuple[int, int, int] = (8, 8, 8),
        num_blocks: int = 1,
        eps: float = 1e-6,
        rel_pos_layout: str = "sam-med3d",
        attention_impl: str = "reference",
    ) -> None:
        super().__init__()
        mlp_dim = int(channels * mlp_ratio)
        size = tuple(input_size)
        self.bidirectional_attentions = nn.ModuleList(
            MutualFeatureEnhancementBlock(channels, num_heads, mlp_dim, size, eps, rel_pos_layout, attention_impl)
            for _ in range(num_blocks)
        )
        self.multi_head_self_attention = MEAAttentionBlock(
            channels, num_heads, mlp_dim, size, eps, rel_pos_layout, attention_impl
        )
        self.add_norm = LayerNorm3d(channels, eps)
        self.add_norm2 = LayerNorm3d(channels, eps)
        self.add_norm3 = LayerNorm3d(channels, eps)
        self.add_norm4 = LayerNorm3d(channels, eps)  # unused by the released forward pass
        self.mlp = MLPBlock(channels, mlp_dim, act=nn.GELU)

    def prepare_image(self, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, image_conv)``: everything that depends on the image embedding alone (computed once per image)."""
        image = self.add_norm3(image_embedding)
        return image, self.bidirectional_attentions[0].image_conv_stage(image)

    def mask_conv_kernel(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The composed kernel of :func:`low_rank_mask_conv` for factored masks with this ``weight`` and ``bias``.

        It depends on parameters only, so callers compute it once per image (or step) and pass it to :meth:`forward`.
        """
        return mask_conv_kernel(self.bidirectional_attentions[0].prompt_conv1, self.add_norm2, weight, bias)

    def normalise_mask(
        self, mask_embedding: torch.Tensor | FactoredDense, kernel: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``add_norm2(mask_embedding)`` and, for a factored embedding, the first MFEB's ``prompt_conv1`` of it composed
        on its few channels (for a plain one None: the block convolves it itself).

        ``kernel`` may pass :meth:`mask_conv_kernel` of ``mask_embedding``'s weight and bias, computed earlier.
        """
        if not isinstance(mask_embedding, FactoredDense):
            return self.add_norm2(mask_embedding), None
        mask, std = self.add_norm2.forward_with_std(mask_embedding.materialise())
        if kernel is None:
            kernel = self.mask_conv_kernel(mask_embedding.weight, mask_embedding.bias)
        return mask, low_rank_mask_conv(self.bidirectional_attentions[0].prompt_conv1, kernel, mask_embedding.z, std)

    def forward(
        self,
        image_embedding: torch.Tensor,
        mask_embedding: torch.Tensor | FactoredDense,
        prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_kernel: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder image tokens from the image embedding and the dense mask embedding (plain or factored).

        ``prepared`` may pass :meth:`prepare_image` and ``mask_kernel`` the matching :meth:`mask_conv_kernel`.
        """
        image, image_conv = self.prepare_image(image_embedding) if prepared is None else prepared
        mask, mask_conv1 = self.normalise_mask(mask_embedding, mask_kernel)
        first = self.bidirectional_attentions[0]
        image_out, mask_out = first(image, mask, image_conv=image_conv, mask_conv1=mask_conv1)
        for block in self.bidirectional_attentions[1:]:
            image_out, mask_out = block(image_out, mask_out)
        fused = image_out + image + mask_out + mask
        x = self.add_norm(self.multi_head_self_attention(fused) + fused)
        return x + _channels_first(self.mlp(_channels_last(x)))


def mask_conv_kernel(conv: nn.Conv3d, norm: LayerNorm3d, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``conv.weight`` composed with ``A = [g * (W - mean_c W), g * (b - mean b), beta]``: ``[C_out, k + 2, ...]``.

    ``norm(W z + b)`` equals ``A @ [z / std, 1 / std, 1]`` per voxel (``std`` the scale ``norm`` divides by), so
    ``conv`` of it equals a convolution of those ``k + 2`` channels with this kernel.
    """
    gain = norm.weight[:, None]
    mix = torch.cat([gain * (weight - weight.mean(0)), gain * (bias - bias.mean())[:, None], norm.bias[:, None]], 1)
    out_ch, in_ch = conv.weight.shape[:2]
    # [C_out, C_in, 27] x [C_in, k + 2] as one batched matmul over C_out: no copy of the large kernel
    kernel = mix.t() @ conv.weight.reshape(out_ch, in_ch, -1)
    return kernel.reshape(out_ch, mix.shape[1], *conv.weight.shape[2:])


def low_rank_mask_conv(conv: nn.Conv3d, kernel: torch.Tensor, z: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``conv(norm(W z + b))`` computed on ``k + 2`` channels ``[z / std, 1 / std, 1]`` instead of ``C``.

    ``kernel`` is :func:`mask_conv_kernel` for ``W``, ``b`` and ``norm``; ``std`` the per-voxel scale ``norm`` divided
    by (:meth:`LayerNorm3d.forward_with_std`). Exact in real arithmetic; zero padding commutes since ``A`` is linear.
    """
    inv = std.reciprocal()
    channels = torch.cat([z * inv, inv, torch.ones_like(inv)], 1)
    return F.conv3d(channels, kernel, conv.bias, conv.stride, conv.padding, conv.dilation)
