"""Simulated clicks: the click rules (``sampling.py``: where a click lands in the errors of a prediction) and the click
simulator of the training and evaluation loop (``simulator.py``). The MONAI transform running them on one sample is
``transforms.SimulateClickd``."""

from .sampling import PADDING_LABEL, STRATEGIES, Click, deepest_voxel, error_regions, sample_click, sample_clicks_batch
from .simulator import TARGETS, ClickSimulator, check_strategy, click_compliance, gather_at_points

__all__ = [
    "PADDING_LABEL",
    "STRATEGIES",
    "TARGETS",
    "Click",
    "ClickSimulator",
    "check_strategy",
    "click_compliance",
    "deepest_voxel",
    "error_regions",
    "gather_at_points",
    "sample_click",
    "sample_clicks_batch",
]
