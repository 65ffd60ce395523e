"""Dataset layouts (datalist builders, case-level splits) and synthetic demo data for M-SAM."""

from __future__ import annotations

from typing import Any

from .layouts import (
    DEFAULT_TARGET_LABELS,
    brats21_datalist,
    case_output_name,
    dataset_json_or,
    default_target_labels,
    imagestr_labelstr_datalist,
    kits19_datalist,
    msd_datalist,
    msd_target_labels,
    split_datalist,
)
from .lits import lits_datalist

_SYNTHETIC = ("make_brats21_like", "make_imagestr_like", "make_kits19_like", "make_msd_like")

__all__ = [
    "DEFAULT_TARGET_LABELS",
    "brats21_datalist",
    "case_output_name",
    "dataset_json_or",
    "default_target_labels",
    "imagestr_labelstr_datalist",
    "kits19_datalist",
    "lits_datalist",
    "msd_datalist",
    "msd_target_labels",
    "split_datalist",
    *_SYNTHETIC,
]


def __getattr__(name: str) -> Any:
    """Import the synthetic writers on first use, so `python -m msam_components.data.synthetic` runs without warning."""
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
