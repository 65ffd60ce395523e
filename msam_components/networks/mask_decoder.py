"""SAM-Med3D mask decoder: two-way transformer over prompt and image tokens, then hypernetwork mask prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, LayerNorm3d
from .rel_pos_attention import check_attention_impl
from .transformer import TwoWayTransformer3D


class MaskDecoder3D(nn.Module):
    """Predicts ``[B, 1, 32, 32, 32]`` low-res mask logits (and an IoU estimate) from fused image tokens and prompts.

    The caller fuses the dense prompt into the image tokens (``image + dense`` for SAM-Med3D, the MEA for M-SAM), so
    the decoder takes ``image_tokens`` directly. ``attention_impl="fast"`` computes only the returned masks, channels
    last, with each (kernel 2, stride 2, so non-overlapping) transposed convolution as one matmul and no transposes
    until one final permutation; ``"reference"`` computes all masks with the plain layers, then selects.
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
        attention_impl: str = "reference",
    ) -> None:
        super().__init__()
        self.attention_impl = check_attention_impl(attention_impl)
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
        if self.attention_impl == "fast":
            hs, src = self._transform(image_tokens, image_pe, sparse_prompt_embeddings, sparse_bias)
            # every hypernetwork runs (cheap, one token each) so unused ones get zero gradients as in the reference
            hyper_in = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
            masks = self._fused_upscale_masks(src, hyper_in[:, sel], image_tokens.shape[2:])
            return masks, self.iou_prediction_head(hs[:, 0, :])[:, sel]
        masks, iou_pred = self.predict_masks(image_tokens, image_pe, sparse_prompt_embeddings, sparse_bias)
        return masks[:, sel], iou_pred[:, sel]

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

    def predict_masks(
        self,
        image_tokens: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        sparse_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks ``[B, T, 32, 32, 32]`` and IoU predictions ``[B, T]`` (the plain layers)."""
        b = image_tokens.shape[0]
        hs, src = self._transform(image_tokens, image_pe, sparse_prompt_embeddings, sparse_bias)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        grid = image_tokens.shape[2:]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, self.transformer_dim, *grid))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        c, spatial = upscaled.shape[1], upscaled.shape[2:]
        masks = (hyper_in @ upscaled.reshape(b, c, -1)).reshape(b, -1, *spatial)
        return masks, self.iou_prediction_head(iou_token_out)

    def _fused_upscale_masks(
        self, src: torch.Tensor, hyper_in: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """``hyper_in @ output_upscaling(src)`` computed channels-last, each transposed conv as one matmul.

        ``src`` ``[B, N, C]`` tokens in raster order, ``hyper_in`` ``[B, T, C / 8]``. A kernel-2, stride-2 transposed
        conv maps each voxel to its own 2x2x2 block, i.e. a matmul to ``8 * C_out`` channels ordered (offset, channel);
        rows stay grouped by (voxel, offset, offset), and one permutation at the end puts the ``T`` masks in place.
        """
        b, t = hyper_in.shape[:2]
        up1, norm, act1, up2, act2 = self.output_upscaling
        x = act1(F.layer_norm(_as_matmul(up1, src), (up1.out_channels,), norm.weight, norm.bias, norm.eps))
        x = act2(_as_matmul(up2, x.reshape(b, -1, up1.out_channels)))
        masks = x.reshape(b, -1, up2.out_channels) @ hyper_in.transpose(1, 2)  # [B, N * 8 * 8, T]
        d, h, w = grid
        masks = masks.view(b, d, h, w, 2, 2, 2, 2, 2, 2, t).permute(0, 10, 1, 4, 7, 2, 5, 8, 3, 6, 9)
        return masks.reshape(b, t, 4 * d, 4 * h, 4 * w)


def _as_matmul(conv: nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-2, stride-2 ``ConvTranspose3d`` on channels-last rows ``[B, N, C_in]``: ``[B, N, 8, C_out]``."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.flatten(2).transpose(1, 2).reshape(c_in, 8 * c_out)  # (offset, channel) columns
    return (x @ weight + conv.bias.repeat(8)).view(*x.shape[:2], 8, c_out)
