"""Bundle tooling: render `bundle_template/` for a task (presets or answers) and pack self-contained bundle archives."""

from .archive import build_archive
from .presets import FIXED_PRESETS, PRESET_NAMES, generic_spec, preset_spec
from .spec import BundleSpec, Modality, placeholder_values
from .template import TEMPLATE_DIR, render_bundle, render_files

__all__ = [
    "FIXED_PRESETS",
    "PRESET_NAMES",
    "TEMPLATE_DIR",
    "BundleSpec",
    "Modality",
    "build_archive",
    "generic_spec",
    "placeholder_values",
    "preset_spec",
    "render_bundle",
    "render_files",
]
