"""Ignite/MONAI engine parts: the click-loop iteration, click inferer, per-click metrics, optimiser and schedule."""

from .training_checkpoint import TrainingCheckpoint, atomic_torch_save
from .click_effects import negative_click_effects
from .click_inferer import ClickHistory, ClickInferer, EmbeddingCache
from .click_metrics import ClickMetricsHandler, summarise_click_metrics
from .interaction import (
    CLICK_COMPLIANCE,
    CLICK_DICE,
    CLICK_IOU,
    ClickSimulator,
    IterativeClickRefinement,
    binarise,
    msam_loss,
)
from .lesion_metrics import LesionMetricsHandler, lesion_detection, summarise_lesions
from .optim import msam_lr_milestones, msam_lr_scheduler, msam_optimizer

__all__ = [
    "CLICK_COMPLIANCE",
    "CLICK_DICE",
    "CLICK_IOU",
    "ClickHistory",
    "ClickInferer",
    "ClickMetricsHandler",
    "ClickSimulator",
    "EmbeddingCache",
    "IterativeClickRefinement",
    "LesionMetricsHandler",
    "binarise",
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
