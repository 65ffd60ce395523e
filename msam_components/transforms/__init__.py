"""Data transforms for M-SAM: interactive click simulation (functional API and a MONAI dictionary transform)."""

from msam_components.transforms.click_sampling import (
    PADDING_LABEL,
    Click,
    error_regions,
    sample_click,
    sample_clicks_batch,
)
from msam_components.transforms.clicks import SimulateClickd

__all__ = ["PADDING_LABEL", "Click", "SimulateClickd", "error_regions", "sample_click", "sample_clicks_batch"]

from msam_components.transforms.spatial import (
    CropOrPadAroundClicksd,
    CropOrPadAroundLabeld,
    CropPadBox,
    MapClicksToImaged,
    compute_crop_or_pad_box,
    parse_clicks,
)

__all__ += [
    "CropOrPadAroundClicksd",
    "CropOrPadAroundLabeld",
    "CropPadBox",
    "MapClicksToImaged",
    "compute_crop_or_pad_box",
    "parse_clicks",
]
