"""The click loop as a MONAI inferer: what a trainer's or evaluator's ``inferer`` runs in M-SAM's protocol.

:class:`ClickLoopInferer` draws each click from the errors of the previous prediction (:class:`ClickSimulator`) and has
the network run every click inside one forward call (``MSAM.refine``), so DistributedDataParallel sees one pass per
step. It returns a :class:`ClickLoopOutput` (all clicks' logits and the simulator holding the click history and
per-click targets), which a per-click loss (:class:`~msam_components.engines.click_loss.PerClickLoss`) reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import Randomizable

from ..checks import as_bool, check_type
from ..clicks.simulator import TARGETS, ClickSimulator, check_strategy
from ..networks.click_prompt import mask_prompt

__all__ = ["ClickLoopInferer", "ClickLoopOutput", "binarise"]


def binarise(logits: torch.Tensor, threshold: float = 0.5, threshold_on: str = "logits") -> torch.Tensor:
    """Foreground mask of logits: ``logits > threshold`` (reference) or ``sigmoid(logits) > threshold``."""
    if threshold_on == "probability":
        return torch.sigmoid(logits) > threshold
    if threshold_on == "logits":
        return logits > threshold
    raise ValueError(f"threshold_on must be 'logits' or 'probability', got {threshold_on!r}")


@dataclass
class ClickLoopOutput:
    """What one run of the click loop gives: ``logits`` ``[B, K, ...]`` after each of the K clicks, and the
    ``simulator`` that drew them (click history, per-click training targets)."""

    logits: torch.Tensor
    simulator: ClickSimulator


class ClickLoopInferer(Inferer, Randomizable):
    """Runs ``num_clicks`` simulated clicks on a batch: a trainer's or evaluator's ``inferer`` (``train#inferer``).

    Args:
        num_clicks: clicks per case (paper: 10; the released code runs 11).
        strategy: ``"random"`` (uniform over FN U FP, the reference), ``"center"`` (deterministic, deepest voxel of
            the larger error region), ``"interior"`` (random voxel in the inner half of the largest error region), or
            a mapping of them to weights for a per-click mixture.
        first_strategy: strategy of the first click (default: ``strategy``).
        threshold, threshold_on: foreground of a prediction for clicks: ``logits > 0.5`` (reference) or
            ``threshold_on="probability"`` for ``sigmoid > threshold``.
        pass_all_clicks: give the decoder every click so far instead of only the current one (reference: current only).
        detach_feedback: stop gradients through the fed-back low-res logits (reference: not detached).
        seed: seeds the click RNG (the iteration update reseeds it: once per run in training, at every epoch start in
            evaluation, plus the distributed rank).
        target: training target per click: ``"all"`` lesion voxels (reference) or the ``"clicked"`` lesions so far.
        initial_mask_prob: training only: share of cases that start from a damaged ground-truth mask.
        feedback_dropout: training only: probability that a fed-back mask is replaced by an empty one.
        initial_mask_scale: logit scale of a given starting mask's prompt (see ``networks.click_prompt.mask_prompt``).

    Training-only options apply when the network is in training mode (the trainer sets it, the evaluator clears it).
    """

    def __init__(
        self,
        num_clicks: int = 10,
        strategy: str = "random",
        first_strategy: str | None = None,
        threshold: float = 0.5,
        threshold_on: str = "logits",
        pass_all_clicks: bool | str = False,
        detach_feedback: bool | str = False,
        seed: int | None = 0,
        target: str = "all",
        initial_mask_prob: float = 0.0,
        feedback_dropout: float = 0.0,
        initial_mask_scale: float = 4.0,
    ) -> None:
        super().__init__()
        check_type("num_clicks", num_clicks, int)
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        check_type("threshold", threshold, (int, float))
        if seed is not None:
            check_type("seed", seed, int)
        check_strategy("strategy", strategy)
        check_strategy("first_strategy", first_strategy)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        for name, value in (("initial_mask_prob", initial_mask_prob), ("feedback_dropout", feedback_dropout)):
            check_type(name, value, (int, float))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not initial_mask_scale > 0:
            raise ValueError(f"initial_mask_scale must be > 0, got {initial_mask_scale!r}")
        binarise(torch.zeros(1), threshold, threshold_on)  # validates threshold_on early
        self.num_clicks, self.strategy, self.first_strategy = num_clicks, strategy, first_strategy
        self.threshold, self.threshold_on = threshold, threshold_on
        self.pass_all_clicks = as_bool(pass_all_clicks, "pass_all_clicks")
        self.detach_feedback = as_bool(detach_feedback, "detach_feedback")
        self.seed, self.target = seed, target
        self.initial_mask_prob, self.feedback_dropout = float(initial_mask_prob), float(feedback_dropout)
        self.initial_mask_scale = float(initial_mask_scale)

    def randomize(self, data: object = None) -> None:
        """Clicks are drawn lazily from ``self.R`` inside the loop; nothing to pre-draw."""

    def reseed(self, offset: int = 0) -> None:
        """Restart the click RNG at ``seed + offset`` (the distributed rank); nothing without a seed."""
        if self.seed is not None:
            self.set_random_state(seed=self.seed + offset)

    def foreground(self, logits: torch.Tensor) -> torch.Tensor:
        """The binarised prediction the clicks (and the click metrics) are drawn from."""
        return binarise(logits, self.threshold, self.threshold_on)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        label: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> ClickLoopOutput:
        """All clicks' logits for ``inputs`` with clicks drawn from ``label`` (binary, ``[B, 1, ...]``); ``start``
        (optional, the label's shape) is a starting mask: the first mask prompt, the first click drawn from its
        errors."""
        if label is None:
            raise ValueError(
                "ClickLoopInferer needs the batch's label to draw clicks from: give the engine "
                "prepare_batch=$msam_components.engines.click_batch()"
            )
        # plain tensors inside the loop: MetaTensor bookkeeping on every network op costs more than small layers
        inputs = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        label = label.as_tensor() if isinstance(label, MetaTensor) else label
        training = bool(network.training)
        simulator = ClickSimulator(
            label,
            self.R,
            self.strategy,
            self.first_strategy,
            self.threshold,
            self.threshold_on,
            target=self.target if training else "all",
            initial_mask_prob=self.initial_mask_prob if training else 0.0,
            feedback_dropout=self.feedback_dropout if training else 0.0,
        )
        feedback = simulator.feedback if simulator.uses_feedback_fn else None
        if start is not None:
            model = getattr(network, "module", network)  # DistributedDataParallel holds the model as .module
            first = mask_prompt(start > 0, model.low_res_size, self.initial_mask_scale).to(inputs.dtype)

            def feedback(i: int, low_res: torch.Tensor, then=feedback) -> torch.Tensor:
                return first if i == 0 else (low_res if then is None else then(i, low_res))

        logits = network(
            inputs,
            click_fn=simulator,
            num_clicks=self.num_clicks,
            detach_feedback=self.detach_feedback,
            feedback_fn=feedback,
            pass_all_clicks=self.pass_all_clicks,
        )
        return ClickLoopOutput(logits, simulator)
