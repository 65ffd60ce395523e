"""M-SAM components for MONAI Bundles: networks, click-simulation transforms, engines and dataset helpers."""

from . import cli, data, engines, networks, transforms

__version__ = "0.1.0"
__all__ = ["cli", "data", "engines", "networks", "transforms", "__version__"]
