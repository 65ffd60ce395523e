"""Optimiser and learning-rate schedule of M-SAM (AdamW, 0.1x for prompt encoder and decoder, steps at 60 % / 90 %)."""

from __future__ import annotations

import torch

from ..checks import check_type
from ..networks.msam import MSAM, msam_parameter_groups


def msam_optimizer(
    model: MSAM, lr: float = 8e-4, weight_decay: float = 0.1, prompt_decoder_lr_scale: float = 0.1
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: LoRA/MEA (and a fine-tuned encoder) at ``lr``, prompt encoder/decoder at 0.1x.

    Weight decay applies to every parameter (norms and biases included), as in the reference trainer.
    """
    model = getattr(model, "module", model)  # accept a DistributedDataParallel wrapper
    return torch.optim.AdamW(
        msam_parameter_groups(model, lr, prompt_decoder_lr_scale), lr=lr, weight_decay=weight_decay
    )


def msam_lr_milestones(num_epochs: int, fractions: tuple[float, ...] = (0.6, 0.9)) -> list[int]:
    """Epochs at which the learning rate drops: 60 % and 90 % of the run (``[120, 180]`` for the paper's 200 epochs)."""
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    return sorted({max(1, int(round(f * num_epochs))) for f in fractions})


def msam_lr_scheduler(
    optimizer: torch.optim.Optimizer, num_epochs: int, gamma: float = 0.1
) -> torch.optim.lr_scheduler.MultiStepLR:
    """``MultiStepLR`` stepped once per epoch with the milestones of :func:`msam_lr_milestones`."""
    check_type("num_epochs", num_epochs, int)  # --num_epochs 2.5 would otherwise run 3 epochs
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=msam_lr_milestones(num_epochs), gamma=gamma)
