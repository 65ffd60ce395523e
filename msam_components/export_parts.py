"""The two modules every export traces (the encoder; one click step on a prepared state) and their example inputs.

Shared by the TorchScript (:mod:`msam_components.export`) and ONNX (:mod:`msam_components.export_onnx`) exports, so
both run the model's own code path and neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from .networks.image_state import ImageState
from .networks.msam import MSAM

__all__ = ["DecodeStepForExport", "EncoderForExport", "example_clicks", "example_prompt", "state_names"]


def state_names(model: MSAM) -> tuple[str, ...]:
    """Names of the per-image state tensors, in the order the encoder returns and the decode step takes them."""
    return ("embedding", "mea_image", "mea_image_conv") if model.use_mea else ("embedding",)


class EncoderForExport(nn.Module):
    """``image [B, 1, S, S, S]`` -> ``prepare_image_state(encode(image))`` as a tuple in :func:`state_names` order.

    Holds only the image encoder and the MEA (not the decoder), so the saved artifact carries only the weights it uses;
    it runs :class:`MSAM`'s own methods on itself, so the exported graph is the model's code, not a copy of it.
    """

    def __init__(self, model: MSAM) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder
        self.mea = model.mea
        self.names = state_names(model)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = MSAM.prepare_image_state(self, MSAM.encode(self, image))  # type: ignore[arg-type]
        tensors = state.tensors()
        return tuple(tensors[name] for name in self.names)


class DecodeStepForExport(nn.Module):
    """``(*state, points [B,N,3], point_labels [B,N], low_res_mask [B,1,L,L,L])`` -> low-res logits: one click step.

    Holds only the prompt encoder, MEA and mask decoder (no image encoder) and runs :meth:`MSAM.decode` on them, with
    the model's ``attention_impl`` (on the fast path the MEA's composed mask kernel is part of the traced step).
    """

    def __init__(self, model: MSAM) -> None:
        super().__init__()
        self.path = model.path
        self.prompt_encoder = model.prompt_encoder
        self.mea = model.mea
        self.mask_decoder = model.mask_decoder
        # the prompt settings decode reads (clicks written into the mask prompt, sizes)
        self.click_stamp, self.click_stamp_sigma = model.click_stamp, model.click_stamp_sigma
        self.image_size, self.low_res_size = model.image_size, model.low_res_size
        self.names = state_names(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.names) + 3:
            raise ValueError(f"expected {', '.join(self.names)}, points, point_labels, low_res_mask; got {len(inputs)}")
        state = ImageState(*inputs[: len(self.names)])  # the mask kernel is computed inside the traced step
        points, point_labels, low_res_mask = inputs[len(self.names) :]
        return MSAM.decode(self, state, points, point_labels, low_res_mask)  # type: ignore[arg-type,return-value]


def example_prompt(model: MSAM, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One positive click at the centre and an all-zero mask prompt: the tracing inputs of the decode step."""
    batch = image.shape[0]
    points = torch.full((batch, 1, 3), model.image_size // 2, dtype=torch.long, device=image.device)
    labels = torch.ones(batch, 1, dtype=torch.long, device=image.device)
    return points, labels, image.new_zeros(batch, 1, *model.low_res_size)


def example_clicks(
    model: MSAM, batch: int = 1, num_clicks: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded in-range clicks ``[B, K, 3]`` with labels positive, negative, positive, ... for :func:`check_export`."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randint(0, model.image_size, (batch, num_clicks, 3), generator=gen)
    labels = (torch.arange(num_clicks) % 2 == 0).long().expand(batch, -1).clone()
    return points, labels
