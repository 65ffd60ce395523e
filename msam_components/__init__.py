"""M-SAM components for MONAI Bundles: networks, click-simulation transforms, engines and dataset helpers."""

from . import data, engines, failure_report, networks, transforms

__version__ = "0.1.0"
__all__ = ["data", "engines", "failure_report", "networks", "transforms", "__version__"]
