"""Iterative click refinement as an ignite ``iteration_update`` for MONAI's ``SupervisedTrainer``/``SupervisedEvaluator``.

This is M-SAM's training and evaluation protocol: encode the image once per batch, then ``num_clicks`` times sample a
click from the current errors, decode with the previous low-res logits fed back, and (in training) sum the loss over
all clicks. The model runs the loop inside one forward call (see ``MSAM.refine``) so DistributedDataParallel works.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_iou
from monai.transforms import Randomizable
from monai.utils import CommonKeys as Keys

from ..checks import check_type
from ..networks.click_prompt import mask_prompt
from ..transforms.click_simulator import TARGETS, ClickSimulator, check_strategy, click_compliance, gather_at_points

logger = logging.getLogger("msam_components")


CLICK_DICE, CLICK_IOU = "click_dice", "click_iou"
CLICK_POINTS, CLICK_LABELS = "click_points", "click_labels"
CLICK_COMPLIANCE = "click_compliance"
LOSS_WEIGHTINGS = ("uniform", "linear")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def msam_loss(lambda_dice: float = 0.5, lambda_ce: float = 0.5) -> DiceCELoss:
    """The paper's per-click loss: squared-prediction soft Dice + binary cross-entropy on logits, weights 0.5/0.5.

    The released code ran monai 1.2.0, where the single-channel CE term is identically 0 (MONAI #6923), i.e. Dice only;
    ``lambda_ce=0.0, lambda_dice=1.0`` reproduces that environment.
    """
    return DiceCELoss(sigmoid=True, squared_pred=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)


def binarise(logits: torch.Tensor, threshold: float = 0.5, threshold_on: str = "logits") -> torch.Tensor:
    """Foreground mask of logits: ``logits > threshold`` (reference) or ``sigmoid(logits) > threshold``."""
    if threshold_on == "probability":
        return torch.sigmoid(logits) > threshold
    if threshold_on == "logits":
        return logits > threshold
    raise ValueError(f"threshold_on must be 'logits' or 'probability', got {threshold_on!r}")


class IterativeClickRefinement(Randomizable):
    """``iteration_update`` running M-SAM's click loop inside MONAI's trainer or evaluator.

    Args:
        num_clicks: clicks per case (paper: 10; the released code runs 11).
        strategy: ``"random"`` (uniform over FN U FP, the reference), ``"center"`` (deterministic, deepest voxel of
            the larger error region), ``"interior"`` (random voxel in the inner half of the largest error region), or
            a mapping of them to weights for a per-click mixture.
        first_strategy: strategy of the first click (default: ``strategy``).
        threshold, threshold_on: foreground of a prediction for clicks and metrics: ``logits > 0.5`` (reference) or
            ``threshold_on="probability"`` for ``sigmoid > threshold``.
        pass_all_clicks: give the decoder every click so far instead of only the current one (reference: current only).
        detach_feedback: stop gradients through the fed-back low-res logits (reference: not detached).
        seed: seeds the click RNG; evaluators reseed it at the start of every epoch so each evaluation sees the same
            clicks. In distributed runs the rank is added to the seed.
        keep_click_logits: also return the per-click full-resolution logits ``[B, K, ...]`` under ``"click_logits"``.
        target: training target per click: ``"all"`` lesion voxels (reference) or the ``"clicked"`` lesions so far
            (connected components touched by a positive click, or present in the starting mask).
        lambda_click: weight of a point loss (binary cross-entropy of the logits at every click so far, against the
            click's label) added to each click's loss, so that ignoring a click costs; 0 (reference) disables it.
        loss_click_weighting: ``"uniform"`` sum over clicks (reference) or ``"linear"`` (click k weighted
            ``2k / (K + 1)``, mean weight 1), so later, corrective clicks count more.
        initial_mask_prob: training only: share of cases that start from a damaged ground-truth mask (lesions dropped,
            dilated or eroded) instead of an empty one.
        feedback_dropout: training only: probability that a fed-back mask is replaced by an empty one.

    The output dict holds ``image``, ``label`` (binary), ``pred`` (final logits ``[B, 1, ...]``), ``loss`` (training),
    ``click_dice``/``click_iou`` ``[B, K]`` (NaN where a case has no lesion), the click history and
    ``click_compliance`` ``[B, K]`` (1 where the clicked voxel carries the clicked label after the click, 0 where it
    does not, NaN for padding clicks).
    """

    def __init__(
        self,
        num_clicks: int = 10,
        strategy: str = "random",
        first_strategy: str | None = None,
        threshold: float = 0.5,
        threshold_on: str = "logits",
        pass_all_clicks: bool = False,
        detach_feedback: bool = False,
        seed: int | None = 0,
        keep_click_logits: bool = False,
        target: str = "all",
        lambda_click: float = 0.0,
        loss_click_weighting: str = "uniform",
        initial_mask_prob: float = 0.0,
        feedback_dropout: float = 0.0,
        initial_mask_key: str | None = None,
        initial_mask_scale: float = 4.0,
    ) -> None:
        check_type("num_clicks", num_clicks, int)
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        check_type("threshold", threshold, (int, float))
        for name, flag in (("pass_all_clicks", pass_all_clicks), ("detach_feedback", detach_feedback)):
            check_type(name, flag, bool)
        if seed is not None:
            check_type("seed", seed, int)
        check_strategy("strategy", strategy)
        check_strategy("first_strategy", first_strategy)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if loss_click_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_click_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_click_weighting!r}")
        for name, value in (("initial_mask_prob", initial_mask_prob), ("feedback_dropout", feedback_dropout)):
            check_type(name, value, (int, float))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        check_type("lambda_click", lambda_click, (int, float))
        if not lambda_click >= 0:
            raise ValueError(f"lambda_click must be >= 0, got {lambda_click!r}")
        binarise(torch.zeros(1), threshold, threshold_on)  # validates threshold_on early
        self.skipped_without_lesion = 0
        self.num_clicks = num_clicks
        self.strategy, self.first_strategy = strategy, first_strategy
        self.threshold, self.threshold_on = threshold, threshold_on
        self.pass_all_clicks = pass_all_clicks
        self.detach_feedback = detach_feedback
        self.seed = seed
        self.keep_click_logits = keep_click_logits
        self.target = target
        self.lambda_click, self.loss_click_weighting = float(lambda_click), loss_click_weighting
        self.initial_mask_prob, self.feedback_dropout = float(initial_mask_prob), float(feedback_dropout)
        if not initial_mask_scale > 0:
            raise ValueError(f"initial_mask_scale must be > 0, got {initial_mask_scale!r}")
        self.initial_mask_key, self.initial_mask_scale = initial_mask_key, float(initial_mask_scale)
        self._seeded_rank: int | None = None

    def randomize(self, data: object = None) -> None:
        """Clicks are drawn lazily from ``self.R`` inside the loop; nothing to pre-draw."""

    def _reseed(self, engine: SupervisedTrainer | SupervisedEvaluator) -> None:
        """Seed once per run (trainer) or at every epoch start (evaluator), offset by the distributed rank."""
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        first_of_epoch = (engine.state.iteration - 1) % max(engine.state.epoch_length or 1, 1) == 0
        evaluator = not isinstance(engine, SupervisedTrainer)
        if self.seed is not None and (self._seeded_rank is None or (evaluator and first_of_epoch)):
            self.set_random_state(seed=self.seed + rank)
            self._seeded_rank = rank

    def _loop(
        self,
        engine,
        inputs: torch.Tensor,
        label: torch.Tensor,
        training: bool = False,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ClickSimulator]:
        simulator = ClickSimulator(
            label,
            self.R,
            self.strategy,
            self.first_strategy,
            self.threshold,
            self.threshold_on,
            self.pass_all_clicks,
            target=self.target if training else "all",
            initial_mask_prob=self.initial_mask_prob if training else 0.0,
            feedback_dropout=self.feedback_dropout if training else 0.0,
        )
        feedback = simulator.feedback if simulator.uses_feedback_fn else None
        if start is not None:  # a given starting mask: the first mask prompt, the first click drawn from its errors
            network = getattr(engine.network, "module", engine.network)
            first = mask_prompt(start > 0, network.low_res_size, self.initial_mask_scale).to(inputs.dtype)

            def feedback(i: int, low_res: torch.Tensor, then=feedback) -> torch.Tensor:
                return first if i == 0 else (low_res if then is None else then(i, low_res))

        logits = engine.network(
            inputs,
            click_fn=simulator,
            num_clicks=self.num_clicks,
            detach_feedback=self.detach_feedback,
            feedback_fn=feedback,
        )
        return logits, simulator

    def _loss(self, loss_function: LossFn, logits: torch.Tensor, simulator: ClickSimulator) -> torch.Tensor:
        """Each click's loss against its target (weighted over clicks), plus the point loss at the clicks so far."""
        num = logits.shape[1]
        weights = (
            [1.0] * num if self.loss_click_weighting == "uniform" else [2 * (k + 1) / (num + 1) for k in range(num)]
        )
        points, labels = simulator.history()
        total = logits.new_zeros(())
        # split, not logits[:, k : k + 1]: each slice's backward would fill a full-size zero gradient of all clicks
        for k, click_logits in enumerate(logits.split(1, dim=1)):
            total = total + weights[k] * loss_function(click_logits, simulator.target(k))
            if self.lambda_click > 0:
                valid = labels[:, : k + 1] != -1
                if bool(valid.any()):
                    at_clicks = gather_at_points(click_logits[:, 0], points[:, : k + 1]).float()
                    bce = F.binary_cross_entropy_with_logits(
                        at_clicks - self._logit_threshold(), labels[:, : k + 1].clamp(min=0).float(), reduction="none"
                    )
                    total = total + weights[k] * self.lambda_click * bce[valid].mean()
        return total

    def _logit_threshold(self) -> float:
        """The threshold on logits equivalent to the configured one (for the point loss)."""
        if self.threshold_on == "logits":
            return float(self.threshold)
        return float(math.log(self.threshold / (1.0 - self.threshold)))

    def _foreground(self, logits: torch.Tensor) -> torch.Tensor:
        """The binarised prediction used for clicks and metrics."""
        return binarise(logits, self.threshold, self.threshold_on)

    def _click_metrics(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-case, per-click Dice and IoU ``[B, K]`` of the binarised predictions (NaN for cases without lesion)."""
        dice, iou = [], []
        with torch.no_grad():
            for k in range(logits.shape[1]):
                pred = binarise(logits[:, k : k + 1].float(), self.threshold, self.threshold_on).float()
                dice.append(compute_dice(pred, label, include_background=True, ignore_empty=True)[:, 0])
                iou.append(compute_iou(pred, label, include_background=True, ignore_empty=True)[:, 0])
        return torch.stack(dice, dim=1).cpu(), torch.stack(iou, dim=1).cpu()

    def __call__(self, engine: SupervisedTrainer | SupervisedEvaluator, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("iteration received no batch data")
        self._reseed(engine)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        if targets is None:
            raise ValueError("the click simulation needs a 'label' in every batch")
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        # plain tensors inside the loop: MetaTensor bookkeeping on every network op costs more than small layers
        inputs = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        targets = targets.as_tensor() if isinstance(targets, MetaTensor) else targets
        label = (targets > 0).to(inputs.dtype if inputs.is_floating_point() else torch.float32)
        engine.state.output[Keys.LABEL] = label
        start = self._start_mask(batchdata, label)
        device_type = inputs.device.type
        if isinstance(engine, SupervisedTrainer):
            keep = label.flatten(1).any(dim=1)
            if not bool(keep.all()):
                self._log_skipped(batchdata, keep)
                if not bool(keep.any()):  # nothing to learn from: no step, a zero loss for the handlers
                    engine.state.output[Keys.LOSS] = torch.zeros((), device=inputs.device)
                    engine.state.output[Keys.PRED] = torch.zeros_like(label)
                    engine.fire_event(IterationEvents.MODEL_COMPLETED)
                    return engine.state.output
                inputs, label = inputs[keep], label[keep]
                engine.state.output.update({Keys.IMAGE: inputs, Keys.LABEL: label})
            return self._train_step(engine, inputs, label)
        with engine.mode(engine.network):
            with torch.autocast(device_type, **engine.amp_kwargs) if engine.amp else nullcontext():
                logits, simulator = self._loop(engine, inputs, label, start=start)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        self._publish(engine, logits, label, simulator)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _publish(
        self,
        engine: SupervisedTrainer | SupervisedEvaluator,
        logits: torch.Tensor,
        label: torch.Tensor,
        simulator: ClickSimulator,
    ) -> None:
        """Put the step's results in ``engine.state.output``: the last click's logits as ``pred``, per-click metrics,
        the click history and compliance (before MODEL_COMPLETED, where decollation and post-processing run)."""
        logits = logits.detach().float()
        engine.state.output[Keys.PRED] = logits[:, -1:]
        engine.state.output[CLICK_DICE], engine.state.output[CLICK_IOU] = self._click_metrics(logits, label)
        points, labels = simulator.history()
        engine.state.output[CLICK_POINTS], engine.state.output[CLICK_LABELS] = points, labels
        engine.state.output[CLICK_COMPLIANCE] = click_compliance(logits, points, labels, self._foreground).cpu()
        if self.keep_click_logits:
            engine.state.output["click_logits"] = logits

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

    def _train_step(self, engine: SupervisedTrainer, inputs: torch.Tensor, label: torch.Tensor) -> dict:
        """One optimisation step run by the trainer's own ``_iteration`` (zero_grad, autocast and GradScaler, gradient
        accumulation, events), with the click loop as its inferer and the per-click loss as its loss function.

        MONAI's step autocasts only on CUDA; on CPU with ``amp`` the step runs inside a CPU autocast region instead.
        """
        step = _ClickStep(self, engine, label)
        saved = engine.inferer, engine.loss_function
        engine.inferer, engine.loss_function = step.infer, step.loss
        cpu_amp = engine.amp and inputs.device.type == "cpu"
        try:
            with torch.autocast("cpu", **engine.amp_kwargs) if cpu_amp else nullcontext():
                output = engine._iteration(engine, {Keys.IMAGE: inputs, Keys.LABEL: label})
        finally:
            engine.inferer, engine.loss_function = saved
        return output


class _ClickStep:
    """The click loop and its loss, in the shape of a trainer's ``inferer`` and ``loss_function``, for one step."""

    def __init__(self, refinement: IterativeClickRefinement, engine: SupervisedTrainer, label: torch.Tensor) -> None:
        self.refinement, self.engine, self.label = refinement, engine, label
        self.loss_function = engine.loss_function
        self.simulator: ClickSimulator | None = None

    def infer(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """All clicks' logits ``[B, K, ...]`` (the trainer stores them as ``pred`` until :meth:`loss` replaces it)."""
        logits, self.simulator = self.refinement._loop(self.engine, inputs, self.label, training=True)
        return logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss over clicks; also publishes the step's outputs, before the trainer's LOSS_COMPLETED event."""
        assert self.simulator is not None, "the trainer computed a loss before running its inferer"
        total = self.refinement._loss(self.loss_function, logits, self.simulator)
        self.refinement._publish(self.engine, logits, self.label, self.simulator)
        return total


__all__ = [
    "CLICK_COMPLIANCE",
    "CLICK_DICE",
    "CLICK_IOU",
    "ClickSimulator",
    "IterativeClickRefinement",
    "binarise",
    "msam_loss",
]
