"""M-SAM's click protocol as an ignite ``iteration_update`` for MONAI's ``SupervisedTrainer``/``SupervisedEvaluator``.

As MONAI's DeepEdit ``Interaction``: :class:`IterativeClickRefinement` edits the batch (binary label, lesion-free
training crops dropped, an optional starting mask) and calls the engine's own ``_iteration``, so the step runs what the
bundle config declares: the engine's ``inferer`` (a :class:`~msam_components.engines.click_loop_inferer.ClickLoopInferer`:
encode once, ``num_clicks`` clicks from the current errors, the previous low-res logits fed back), its
``loss_function`` (a :class:`~msam_components.engines.click_loss.PerClickLoss` in training) and its
``prepare_batch`` (MONAI's ``PrepareBatchExtraInput``, which hands the inferer the label and the starting mask).
After the loss (training) or the forward pass (evaluation) it publishes the last click's logits as ``pred`` and the
per-click metrics, before the engine's post-processing runs.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from monai.data import MetaTensor
from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator, SupervisedTrainer, default_prepare_batch
from monai.engines.utils import IterationEvents
from monai.metrics import compute_dice, compute_iou
from monai.utils import CommonKeys as Keys

from ..clicks.simulator import ClickSimulator, click_compliance
from .click_loop_inferer import ClickLoopInferer, ClickLoopOutput, binarise
from .click_loss import PerClickLoss, msam_loss

logger = logging.getLogger("msam_components")


CLICK_DICE, CLICK_IOU = "click_dice", "click_iou"
CLICK_POINTS, CLICK_LABELS = "click_points", "click_labels"
CLICK_COMPLIANCE = "click_compliance"
START_KEY = "click_start"  # the batch key of a starting mask, as the Interaction hands it to the inferer
MOVED_OPTIONS = {
    **{
        name: "ClickLoopInferer (train#inferer / validate#inferer)"
        for name in (
            "num_clicks",
            "strategy",
            "first_strategy",
            "threshold",
            "threshold_on",
            "pass_all_clicks",
            "detach_feedback",
            "seed",
            "target",
            "initial_mask_prob",
            "feedback_dropout",
            "initial_mask_scale",
        )
    },
    "lambda_click": "PerClickLoss (train#loss)",
    "loss_click_weighting": "PerClickLoss (train#loss, as weighting)",
}


def click_batch() -> PrepareBatchExtraInput:
    """The engines' ``prepare_batch``: the image and label, plus the label and starting mask for the click loop."""
    return PrepareBatchExtraInput(extra_keys={"label": Keys.LABEL, "start": START_KEY})


class IterativeClickRefinement:
    """``iteration_update`` running M-SAM's click loop through the engine's own step (see the module doc).

    Args:
        initial_mask_key: evaluation only: the batch key of starting masks (the first mask prompt, the first click
            drawn from its errors); None starts from nothing.
        keep_click_logits: also put the per-click full-resolution logits ``[B, K, ...]`` in the output
            (``"click_logits"``).

    The output dict holds ``image``, ``label`` (binary), ``pred`` (final logits ``[B, 1, ...]``), ``loss`` (training),
    ``click_dice``/``click_iou`` ``[B, K]`` (NaN where a case has no lesion), the click history and
    ``click_compliance`` ``[B, K]`` (1 where the clicked voxel carries the clicked label after the click, 0 where it
    does not, NaN for padding clicks). The click options live on the engine's inferer, the loss options on its loss.
    """

    def __init__(self, initial_mask_key: str | None = None, keep_click_logits: bool = False, **moved: object) -> None:
        for name in moved:
            where = MOVED_OPTIONS.get(name)
            raise TypeError(
                f"IterativeClickRefinement got {name!r}: "
                + (f"this option belongs to {where}" if where else "not an option of it")
                + " (the iteration update only edits the batch; the engine's inferer and loss run the step)"
            )
        self.initial_mask_key, self.keep_click_logits = initial_mask_key, keep_click_logits
        self.skipped_without_lesion = 0
        self._seeded = False

    def _check(self, engine: SupervisedTrainer | SupervisedEvaluator) -> ClickLoopInferer:
        """The engine's click-loop inferer; a clear error when the engine is not configured for the click loop."""
        where = "train" if isinstance(engine, SupervisedTrainer) else "validate"
        if not isinstance(engine.inferer, ClickLoopInferer):
            raise TypeError(
                f"{where}#inferer must be a msam_components.engines.ClickLoopInferer (the click loop), got "
                f"{type(engine.inferer).__name__}"
            )
        if where == "train" and not isinstance(engine.loss_function, PerClickLoss):
            raise TypeError(
                f"train#loss must be a msam_components.engines.PerClickLoss (a loss over the click loop's clicks), "
                f"got {type(engine.loss_function).__name__}"
            )
        if not isinstance(engine.prepare_batch, PrepareBatchExtraInput):
            raise TypeError(
                f"{where}'s prepare_batch must hand the click loop its label: use "
                f"$msam_components.engines.click_batch(), got {type(engine.prepare_batch).__name__}"
            )
        event = IterationEvents.LOSS_COMPLETED if where == "train" else IterationEvents.FORWARD_COMPLETED
        if not engine.has_event_handler(self._publish, event):
            engine.add_event_handler(event, self._publish)
        return engine.inferer

    def _reseed(self, engine: SupervisedTrainer | SupervisedEvaluator, inferer: ClickLoopInferer) -> None:
        """Seed the clicks once per run (trainer) or at every epoch start (evaluator), offset by the distributed rank."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        first_of_epoch = (engine.state.iteration - 1) % max(engine.state.epoch_length or 1, 1) == 0
        evaluator = not isinstance(engine, SupervisedTrainer)
        if not self._seeded or (evaluator and first_of_epoch):
            inferer.reseed(rank)
            self._seeded = True

    def __call__(self, engine: SupervisedTrainer | SupervisedEvaluator, batchdata: dict) -> dict:
        """One training or evaluation step of the click loop on ``batchdata``."""
        if batchdata is None:
            raise ValueError("iteration received no batch data")
        inferer = self._check(engine)
        self._reseed(engine, inferer)
        image, targets = default_prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if targets is None:
            raise ValueError("the click simulation needs a 'label' in every batch")
        targets = targets.as_tensor() if isinstance(targets, MetaTensor) else targets
        label = (targets > 0).to(image.dtype if image.is_floating_point() else torch.float32)
        batch = {Keys.IMAGE: image, Keys.LABEL: label, START_KEY: self._start_mask(batchdata, label)}
        if isinstance(engine, SupervisedTrainer):
            keep = label.flatten(1).any(dim=1)
            if not bool(keep.all()):
                self._log_skipped(batchdata, keep)
                if not bool(keep.any()):  # nothing to learn from: no step, a zero loss for the handlers
                    engine.state.output = {
                        Keys.IMAGE: image,
                        Keys.LABEL: label,
                        Keys.LOSS: torch.zeros((), device=image.device),
                        Keys.PRED: torch.zeros_like(label),
                    }
                    engine.fire_event(IterationEvents.MODEL_COMPLETED)
                    return engine.state.output
                batch = {Keys.IMAGE: image[keep], Keys.LABEL: label[keep], START_KEY: None}
        # MONAI's steps autocast only on CUDA; on CPU with ``amp`` the step runs inside a CPU autocast region instead
        cpu_amp = engine.amp and image.device.type == "cpu"
        with torch.autocast("cpu", **engine.amp_kwargs) if cpu_amp else nullcontext():
            return engine._iteration(engine, batch)

    def _publish(self, engine: SupervisedTrainer | SupervisedEvaluator) -> None:
        """Replace the click loop's output by the last click's logits as ``pred`` and add per-click metrics, the click
        history and compliance (after the loss, before MODEL_COMPLETED, where decollation and post-processing run)."""
        output = engine.state.output
        loop = output.get(Keys.PRED)
        if not isinstance(loop, ClickLoopOutput):
            return
        inferer: ClickLoopInferer = engine.inferer
        logits, label = loop.logits.detach().float(), output[Keys.LABEL]
        output[Keys.PRED] = logits[:, -1:]
        output[CLICK_DICE], output[CLICK_IOU] = click_metrics(logits, label, inferer.foreground)
        points, labels = loop.simulator.history()
        output[CLICK_POINTS], output[CLICK_LABELS] = points, labels
        output[CLICK_COMPLIANCE] = click_compliance(logits, points, labels, inferer.foreground).cpu()
        if self.keep_click_logits:
            output["click_logits"] = logits

    def _start_mask(self, batchdata: dict, label: torch.Tensor) -> torch.Tensor | None:
        """The batch's starting masks (``initial_mask_key``, evaluation only), on the label's device and shape."""
        if self.initial_mask_key is None:
            return None
        if self.initial_mask_key not in batchdata:
            raise KeyError(
                f"initial_mask_key {self.initial_mask_key!r} is not in the batch (keys: {sorted(batchdata)})"
            )
        start = batchdata[self.initial_mask_key]
        start = start.as_tensor() if isinstance(start, MetaTensor) else torch.as_tensor(start)
        if start.shape != label.shape:
            raise ValueError(f"{self.initial_mask_key!r} has shape {list(start.shape)}, the label {list(label.shape)}")
        return start.to(label.device)

    def _log_skipped(self, batchdata: dict, keep: torch.Tensor) -> None:
        """Training skips crops without any target voxel (no click can be simulated); count and name them."""
        names = []
        image = batchdata.get("image") if isinstance(batchdata, dict) else None
        meta = getattr(image, "meta", {}) if image is not None else {}
        files = meta.get("filename_or_obj", [])
        for i, kept in enumerate(keep.tolist()):
            if not kept:
                self.skipped_without_lesion += 1
                names.append(
                    str(files[i]) if isinstance(files, (list, tuple)) and i < len(files) else f"batch item {i}"
                )
        logger.warning(
            f"skipped {len(names)} training case(s) without target lesion in the crop ({', '.join(names)}); "
            f"{self.skipped_without_lesion} skipped so far"
        )


def click_metrics(logits: torch.Tensor, label: torch.Tensor, foreground=binarise) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-case, per-click Dice and IoU ``[B, K]`` of the binarised predictions (NaN for cases without lesion)."""
    dice, iou = [], []
    with torch.no_grad():
        for k in range(logits.shape[1]):
            pred = foreground(logits[:, k : k + 1].float()).float()
            dice.append(compute_dice(pred, label, include_background=True, ignore_empty=True)[:, 0])
            iou.append(compute_iou(pred, label, include_background=True, ignore_empty=True)[:, 0])
    return torch.stack(dice, dim=1).cpu(), torch.stack(iou, dim=1).cpu()


__all__ = [
    "CLICK_COMPLIANCE",
    "CLICK_DICE",
    "CLICK_IOU",
    "ClickLoopInferer",
    "ClickSimulator",
    "IterativeClickRefinement",
    "PerClickLoss",
    "binarise",
    "click_batch",
    "click_metrics",
    "msam_loss",
]
