"""What :meth:`MSAM.decode` needs per image, computed once by :meth:`MSAM.prepare_embedding` and reused by every click."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ImageState:
    """The per-image state of the click loop.

    Attributes:
        embedding: the image encoder's output ``[B, C, d, h, w]``.
        mea_image: the MEA's normalised image embedding (``None`` without MEA).
        mea_image_conv: the MEA's image-only convolution stage of it (``None`` without MEA).
        mask_kernel: the MEA's composed mask-branch kernel when the compute path factors the mask embedding; it
            depends on parameters only, and is computed per image so it stays in step with training.
    """

    embedding: torch.Tensor
    mea_image: torch.Tensor | None = None
    mea_image_conv: torch.Tensor | None = None
    mask_kernel: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are set, by field name (static buffers of CUDA graphs, export)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def select(self, index: int | slice) -> ImageState:
        """The state of some batch items (``mask_kernel`` is per model, so it is kept whole)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        per_image = {k: v[index] for k, v in self.tensors().items() if k != "mask_kernel"}
        return ImageState(**per_image, mask_kernel=self.mask_kernel)
