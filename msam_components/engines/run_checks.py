"""Training guards: stop a run that learned from nothing before it writes weights that look like a trained model."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys as Keys

logger = logging.getLogger("msam_components")


class RequireLesionCases:
    """Raise at the end of the first epoch in which no training case held a target voxel (every case skipped).

    ``IterativeClickRefinement`` skips crops without a lesion (no click can be simulated). If that is every case, for
    example ``target_labels`` names a label that no segmentation contains, nothing is learned and the validation's
    ``CheckpointSaver`` would still write an untrained ``model.pt``. Attach before the checkpoint and validation
    handlers, so the error comes first and nothing is written.
    """

    def __init__(self, target_labels: object = None) -> None:
        self.target_labels = target_labels
        self._cases_with_lesion = 0

    def attach(self, engine: Engine) -> None:
        """Count lesion cases per iteration and check at each epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _reset(self, engine: Engine) -> None:
        self._cases_with_lesion = 0

    def _count(self, engine: Engine) -> None:
        """Add the cases of this iteration whose (click-loop) label has a voxel; output is a batch or decollated."""
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            label = item.get(Keys.LABEL) if isinstance(item, dict) else None
            if isinstance(label, torch.Tensor) and label.numel():
                batched = isinstance(output, dict) and label.ndim >= 2
                self._cases_with_lesion += int(label.flatten(1).any(dim=1).sum()) if batched else int(label.any())

    def _check(self, engine: Engine) -> None:
        if self._cases_with_lesion == 0:
            raise ValueError(
                f"no training case of epoch {engine.state.epoch} contains a voxel of target_labels "
                f"{self.target_labels!r}: every case was skipped and nothing was learned, so no model is written; "
                "check --target_labels against the label values of your segmentations"
            )
