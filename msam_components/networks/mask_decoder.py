"""SAM-Med3D mask decoder: two-way transformer over prompt and image tokens, then hypernetwork mask prediction."""

from __future__ import annotations

import torch
from torch import nn

from .compute_paths import UsesComputePath
from .layers import MLP, LayerNorm3d
from .transformer import TwoWayTransformer3D


class MaskDecoder3D(UsesComputePath, nn.Module):
    """Predicts ``[B, 1, 32, 32, 32]`` low-res mask logits (and an IoU estimate) from fused image tokens and prompts.

    The caller fuses the dense prompt into the image tokens (``image + dense`` for SAM-Med3D, the MEA for M-SAM), so
    the decoder takes ``image_tokens`` directly. Its compute path picks the tokens-to-masks step
    (``decoder_masks.py``): all masks with the plain layers, then the selected ones (reference), or only the selected
    ones, fused (fast).
    """

    def __init__(
        self,
        transformer_dim: int = 384,
        num_multimask_outputs: int = 3,
        transformer_depth: int = 2,
        transformer_num_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(
            transformer_depth,
            transformer_dim,
            transformer_num_heads,
            transformer_mlp_dim,
            attention_downsample_rate,
            norm_eps,
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
        sparse_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masks, iou_pred)``: mask 0 only (``[B,1,...]``, ``[B,1]``) or masks 1..3 when ``multimask_output``.

        ``sparse_bias`` ``[B, N]`` (0 or ``-inf`` per prompt token) leaves ``-inf`` tokens out of the attention.
        """
        sel = slice(1, None) if multimask_output else slice(0, 1)
        hs, src = self._transform(image_tokens, image_pe, sparse_prompt_embeddings, sparse_bias)
        masks = self.path.decoder_masks(self, hs, src, tuple(image_tokens.shape[2:]), sel)
        return masks, self.iou_prediction_head(hs[:, 0, :])[:, sel]

    def _transform(
        self,
        image_tokens: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        sparse_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer over ``[iou, mask tokens..., prompts]``: output tokens and image tokens."""
        b = image_tokens.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        token_bias = None
        if sparse_bias is not None:  # the output tokens always take part
            token_bias = torch.cat([sparse_bias.new_zeros(b, output_tokens.shape[0]), sparse_bias], dim=1)
        return self.transformer(image_tokens, image_pe, tokens, token_bias)
