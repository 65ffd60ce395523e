"""Mask-Enhanced Adapter (MEA): fuses the previous mask's embedding into the image embedding before the decoder.

The data flow follows M-SAM's released code (``BiDirectionalAttentionNetwork``), which produced the published numbers;
parameter names follow its state dict so official checkpoints load one to one. See docs in ``msam_reference.md`` §2.

The mask prompt arrives as a :class:`mask_input.MaskInput` (normalised mask, and where the compute path computed it
the first block's mask convolution), so the MEA runs the same code on either path.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerNorm3d, MLPBlock
from .mask_input import MaskInput
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
    ) -> None:
        super().__init__(dim, num_heads, input_size, qkv_bias=True, rel_pos_layout=rel_pos_layout)
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
    ) -> None:
        super().__init__()
        for branch in ("image", "prompt"):
            setattr(self, f"{branch}_conv1", nn.Conv3d(channels, channels, kernel_size=3, padding=1))
            setattr(self, f"{branch}_norm", LayerNorm3d(channels, eps))
            setattr(self, f"{branch}_conv2", nn.Conv3d(channels, channels, kernel_size=1))
            for i in (1, 2, 3):
                setattr(self, f"{branch}_addnorm{i}", LayerNorm3d(channels, eps))
            attn = MEAAttentionBlock(channels, num_heads, mlp_dim, input_size, eps, rel_pos_layout)
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
    ) -> None:
        super().__init__()
        mlp_dim = int(channels * mlp_ratio)
        size = tuple(input_size)
        self.bidirectional_attentions = nn.ModuleList(
            MutualFeatureEnhancementBlock(channels, num_heads, mlp_dim, size, eps, rel_pos_layout)
            for _ in range(num_blocks)
        )
        self.multi_head_self_attention = MEAAttentionBlock(channels, num_heads, mlp_dim, size, eps, rel_pos_layout)
        self.add_norm = LayerNorm3d(channels, eps)
        self.add_norm2 = LayerNorm3d(channels, eps)
        self.add_norm3 = LayerNorm3d(channels, eps)
        self.add_norm4 = LayerNorm3d(channels, eps)  # unused by the released forward pass
        self.mlp = MLPBlock(channels, mlp_dim, act=nn.GELU)

    def prepare_image(self, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, image_conv)``: everything that depends on the image embedding alone (computed once per image)."""
        image = self.add_norm3(image_embedding)
        return image, self.bidirectional_attentions[0].image_conv_stage(image)

    @property
    def mask_conv(self) -> nn.Conv3d:
        """The first block's mask-branch convolution (``prompt_conv1``), which the fast path computes factored."""
        return self.bidirectional_attentions[0].prompt_conv1

    def mask_input(self, dense: torch.Tensor) -> MaskInput:
        """The plain (reference) mask input of a dense mask embedding ``[B, C, D, H, W]``."""
        return MaskInput(self.add_norm2(dense))

    def forward(
        self,
        image_embedding: torch.Tensor,
        mask_input: MaskInput,
        prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decoder image tokens from the image embedding and the mask prompt.

        ``mask_input`` comes from the compute path (``ComputePath.mea_mask_input``; for a plain dense embedding
        use :meth:`mask_input`). ``prepared`` may pass :meth:`prepare_image`.
        """
        image, image_conv = self.prepare_image(image_embedding) if prepared is None else prepared
        first = self.bidirectional_attentions[0]
        image_out, mask_out = first(image, mask_input.mask, image_conv=image_conv, mask_conv1=mask_input.conv1)
        for block in self.bidirectional_attentions[1:]:
            image_out, mask_out = block(image_out, mask_out)
        fused = image_out + image + mask_out + mask_input.mask
        x = self.add_norm(self.multi_head_self_attention(fused) + fused)
        return x + _channels_first(self.mlp(_channels_last(x)))
