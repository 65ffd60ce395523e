"""Data transforms for M-SAM: click simulation, lesion-/click-centred crops, click mapping, intensity normalisation."""

from ..clicks.sampling import PADDING_LABEL, Click, error_regions, sample_click, sample_clicks_batch
from ..clicks.simulator import ClickSimulator
from .clicks import SimulateClickd
from .damage import DamageMaskd, damage_mask
from .instances import ClickInstancesd, click_instances
from .intensity import NormalizeIntensityAboved
from .paste import PasteWindowd, paste_window, window_geometry
from .resample import SeparableSpacingd
from .spatial import (
    CropOrPadAroundClicksd,
    CropOrPadAroundLabeld,
    CropPadBox,
    MapClicksToImaged,
    compute_crop_or_pad_box,
    parse_clicks,
)
from .validation import NamedNibabelReader, ValidateVolumesd, WarnEmptyMaskd, WarnIfNotHounsfieldd

__all__ = [
    "PADDING_LABEL",
    "Click",
    "ClickInstancesd",
    "ClickSimulator",
    "CropOrPadAroundClicksd",
    "CropOrPadAroundLabeld",
    "CropPadBox",
    "DamageMaskd",
    "MapClicksToImaged",
    "NamedNibabelReader",
    "NormalizeIntensityAboved",
    "PasteWindowd",
    "SeparableSpacingd",
    "SimulateClickd",
    "ValidateVolumesd",
    "WarnEmptyMaskd",
    "WarnIfNotHounsfieldd",
    "click_instances",
    "compute_crop_or_pad_box",
    "damage_mask",
    "error_regions",
    "parse_clicks",
    "paste_window",
    "sample_click",
    "sample_clicks_batch",
    "window_geometry",
]
