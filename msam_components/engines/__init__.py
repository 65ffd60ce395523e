"""Ignite/MONAI engine parts: the click-loop iteration, click inferer, per-click metrics, optimiser and schedule."""

from .click_effects import negative_click_effects
from .click_inferer import ClickInferer
from .embedding_cache import ClickHistory, EmbeddingCache
from .click_loop_inferer import ClickLoopInferer, ClickLoopOutput, binarise
from .click_loss import PerClickLoss, msam_loss
from .click_metrics import ClickMetricsHandler, summarise_click_metrics
from .interaction import CLICK_COMPLIANCE, CLICK_DICE, CLICK_IOU, ClickSimulator, IterativeClickRefinement, click_batch
from .lesion_metrics import LesionMetricsHandler, lesion_detection, summarise_lesions
from .optim import msam_lr_milestones, msam_lr_scheduler, msam_optimizer
from .training_checkpoint import TrainingCheckpoint, atomic_torch_save

__all__ = [
    "CLICK_COMPLIANCE",
    "CLICK_DICE",
    "CLICK_IOU",
    "ClickHistory",
    "ClickInferer",
    "ClickLoopInferer",
    "ClickLoopOutput",
    "ClickMetricsHandler",
    "ClickSimulator",
    "EmbeddingCache",
    "IterativeClickRefinement",
    "LesionMetricsHandler",
    "PerClickLoss",
    "binarise",
    "click_batch",
    "lesion_detection",
    "msam_loss",
    "msam_lr_milestones",
    "msam_lr_scheduler",
    "msam_optimizer",
    "negative_click_effects",
    "summarise_click_metrics",
    "summarise_lesions",
    "TrainingCheckpoint",
    "atomic_torch_save",
]
