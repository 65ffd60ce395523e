"""The one click loop: clicks decoded one after another on a prepared image, each decode fed the previous logits.

Training, evaluation (simulated clicks, through ``MSAM.forward``), ``ClickInferer`` (a user's clicks, resumed from a
cached history) and so the MONAI Label task all run :class:`ClickLoop`. It holds the click history, decides which
clicks each decode gets (the current one, or every click so far) and feeds the low-res logits back; the model only
gives ``decode`` and ``upsample`` (and, before the loop, ``encode`` and ``prepare_embedding``), as segment-anything's
``SamPredictor`` embeds once and predicts per click. Where the clicks come from is the caller's: a
:class:`GivenClicks` list, or a simulator drawing each click from the previous prediction's errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .image_state import ImageState

# click_fn(iteration, previous full-resolution logits or None) -> the new clicks (points [B, N, 3], labels [B, N])
ClickFn = Callable[[int, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]
# feedback_fn(iteration, low-res mask prompt [B, 1, d, h, w]) -> the mask prompt to use (the same object if unchanged)
FeedbackFn = Callable[[int, torch.Tensor], torch.Tensor]
DecodeFn = Callable[[ImageState, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ClickModel(Protocol):
    """What the loop needs of a model: one decode per click and the upsampling of its low-res logits."""

    def decode(
        self, embedding: ImageState, points: torch.Tensor, point_labels: torch.Tensor, low_res_mask: torch.Tensor
    ) -> torch.Tensor: ...

    def upsample(self, low_res_logits: torch.Tensor) -> torch.Tensor: ...


class GivenClicks:
    """A click source of fixed clicks (a user's), ``per_step`` of them per decode, in order."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor, per_step: int = 1) -> None:
        self.points, self.labels, self.per_step = points, labels, per_step

    def __call__(self, step: int, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        window = slice(step * self.per_step, (step + 1) * self.per_step)
        return self.points[:, window], self.labels[:, window]


class ClickLoop:
    """Decodes ``num_clicks`` steps on one prepared image and keeps what they decoded (see the module doc).

    Args:
        pass_all_clicks: each decode gets every click so far (``cumulative``) instead of only the step's new clicks.
        detach_feedback: stop gradients through the fed-back low-res logits (the reference keeps them).
        points, labels: clicks already decoded (a resumed history, ``[B, N, 3]`` / ``[B, N]``), empty by default.

    After :meth:`run`, ``points``/``labels`` hold every click in order and ``low_res`` the logits after each step.
    """

    def __init__(
        self,
        pass_all_clicks: bool = False,
        detach_feedback: bool = False,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        self.pass_all_clicks, self.detach_feedback = pass_all_clicks, detach_feedback
        self.points: list[torch.Tensor] = [] if points is None or points.shape[1] == 0 else [points]
        self.labels: list[torch.Tensor] = [] if labels is None or labels.shape[1] == 0 else [labels]
        self.low_res: list[torch.Tensor] = []

    def passed(self, points: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the step's new clicks; return the clicks its decode gets."""
        self.points.append(points)
        self.labels.append(labels)
        if self.pass_all_clicks:
            return torch.cat(self.points, dim=1), torch.cat(self.labels, dim=1)
        return points, labels

    def run(
        self,
        model: ClickModel,
        state: ImageState,
        clicks: ClickFn,
        num_clicks: int,
        low_res: torch.Tensor,
        feedback_fn: FeedbackFn | None = None,
        decode: DecodeFn | None = None,
        full_each_step: bool = True,
    ) -> list[torch.Tensor]:
        """Run the steps from the mask prompt ``low_res``; returns the full-resolution logits after each step
        (``full_each_step``, what a simulator drawing clicks from the errors and a per-click loss need) or only after
        the last one (a user's clicks).

        ``clicks(i, logits)`` gives step ``i``'s new clicks from the previous step's detached full-resolution logits
        (None before the first step). ``feedback_fn(i, low_res)`` may replace the mask prompt before step ``i``'s
        clicks are drawn (training recipes: a damaged starting mask, a dropped feedback). ``decode`` replaces
        ``model.decode`` (e.g. a CUDA-graph replay of it).
        """
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        decode = decode or model.decode
        full, outputs = None, []
        for i in range(num_clicks):
            if feedback_fn is not None:
                fed = feedback_fn(i, low_res)
                if fed is not low_res:
                    low_res, full = fed, model.upsample(fed)
            points, labels = self.passed(*clicks(i, None if full is None else full.detach()))
            low_res = decode(state, points, labels, low_res.detach() if self.detach_feedback else low_res)
            self.low_res.append(low_res)
            if full_each_step:
                full = model.upsample(low_res)
                outputs.append(full)
        return outputs if full_each_step else [model.upsample(low_res)]
