"""The per-click loss of M-SAM's training step: a base loss summed over the clicks of one click loop.

:class:`PerClickLoss` is the trainer's ``loss_function`` (``train#loss``): it takes the click loop's
:class:`~msam_components.engines.click_loop_inferer.ClickLoopOutput` and scores every click's logits against that
click's target, optionally weighting later clicks more and adding a point loss at the clicks so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from ..checks import check_type
from ..clicks.simulator import gather_at_points
from .click_loop_inferer import ClickLoopOutput

__all__ = ["LOSS_WEIGHTINGS", "PerClickLoss", "msam_loss"]

LOSS_WEIGHTINGS = ("uniform", "linear")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def msam_loss(lambda_dice: float = 0.5, lambda_ce: float = 0.5) -> DiceCELoss:
    """The paper's per-click loss: squared-prediction soft Dice + binary cross-entropy on logits, weights 0.5/0.5.

    The released code ran monai 1.2.0, where the single-channel CE term is identically 0 (MONAI #6923), i.e. Dice only;
    ``lambda_ce=0.0, lambda_dice=1.0`` reproduces that environment.
    """
    return DiceCELoss(sigmoid=True, squared_pred=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)


class PerClickLoss(torch.nn.Module):
    """Sum over clicks of ``loss(click logits, click target)``, weighted per click, plus an optional point loss.

    Args:
        loss: the per-click loss (default :func:`msam_loss`, the paper's Dice + CE).
        weighting: ``"uniform"`` sum over clicks (reference) or ``"linear"`` (click k weighted ``2k / (K + 1)``, mean
            weight 1), so later, corrective clicks count more.
        lambda_click: weight of a point loss (binary cross-entropy of the logits at every click so far, against the
            click's label, around the click threshold) added to each click's loss, so that ignoring a click costs; 0
            (reference) disables it.
        threshold, threshold_on: the click threshold the point loss is centred on (as the click loop's).
    """

    def __init__(
        self,
        loss: LossFn | None = None,
        weighting: str = "uniform",
        lambda_click: float = 0.0,
        threshold: float = 0.5,
        threshold_on: str = "logits",
    ) -> None:
        super().__init__()
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_click_weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
        check_type("lambda_click", lambda_click, (int, float))
        if not lambda_click >= 0:
            raise ValueError(f"lambda_click must be >= 0, got {lambda_click!r}")
        if threshold_on not in ("logits", "probability"):
            raise ValueError(f"threshold_on must be 'logits' or 'probability', got {threshold_on!r}")
        self.loss = msam_loss() if loss is None else loss
        self.weighting, self.lambda_click = weighting, float(lambda_click)
        self.logit_threshold = float(threshold if threshold_on == "logits" else math.log(threshold / (1 - threshold)))

    def forward(self, output: ClickLoopOutput, target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one click loop; the targets are the simulator's per click (``target``, the trainer's label, is
        what they are drawn from and is not read again)."""
        if not isinstance(output, ClickLoopOutput):
            raise TypeError(
                f"PerClickLoss scores a click loop's output (ClickLoopOutput from ClickLoopInferer), got "
                f"{type(output).__name__}: the trainer's inferer must be a ClickLoopInferer"
            )
        logits, simulator = output.logits, output.simulator
        num = logits.shape[1]
        weights = [1.0] * num if self.weighting == "uniform" else [2 * (k + 1) / (num + 1) for k in range(num)]
        points, labels = simulator.history()
        total = logits.new_zeros(())
        # split, not logits[:, k : k + 1]: each slice's backward would fill a full-size zero gradient of all clicks
        for k, click_logits in enumerate(logits.split(1, dim=1)):
            total = total + weights[k] * self.loss(click_logits, simulator.target(k))
            if self.lambda_click > 0:
                valid = labels[:, : k + 1] != -1
                if bool(valid.any()):
                    at_clicks = gather_at_points(click_logits[:, 0], points[:, : k + 1]).float()
                    bce = F.binary_cross_entropy_with_logits(
                        at_clicks - self.logit_threshold, labels[:, : k + 1].clamp(min=0).float(), reduction="none"
                    )
                    total = total + weights[k] * self.lambda_click * bce[valid].mean()
        return total
