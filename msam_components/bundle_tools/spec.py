"""What describes one tumour task (a `BundleSpec`), and the placeholder values it gives `bundle_template/`.

A bundle differs from another only in its data: how the datalist is built, which label values form the target, the
modality (which decides the intensity preprocessing) and the texts that describe the task. Everything else (network,
click loop, engines, handlers) is shared and lives verbatim in the template.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

__all__ = [
    "CT",
    "MODALITIES",
    "MR",
    "SPLIT_BULLET",
    "BundleSpec",
    "Modality",
    "format_labels",
    "placeholder_values",
    "wrap",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ONE_LINE_FIELDS = (
    "name",
    "dataset",
    "datalist",
    "config_title",
    "data_comment",
    "readme_title",
    "display_name",
    "task",
    "changelog_task",
    "data_source",
    "label_classes",
    "example_dataset_dir",
    "example_image_path",
)


@dataclass(frozen=True)
class Modality:
    """How one imaging modality is normalised in the configs, and how the bundle's texts describe that."""

    name: str  # metadata `network_data_format.inputs.image.modality`
    intensity_settings: str  # top-level config lines shared by train.yaml and inference.yaml ("" for none)
    intensity_transforms: str  # YAML list of MONAI transforms at indent 0; the renderer indents it
    preprocessing_comment: str  # fragment of train.yaml's "# shared preprocessing: ..." comment
    image_classes: str  # metadata `image_classes`
    preprocessing_bullet: str  # README "Data" bullet, wrapped at 120 columns


CT = Modality(
    name="CT",
    intensity_settings="intensity_range: [-1000, 1000]",
    intensity_transforms="""\
- _target_: msam_components.transforms.WarnIfNotHounsfieldd
  keys: image
- _target_: ScaleIntensityRanged
  keys: image
  a_min: "$@intensity_range[0]"
  a_max: "$@intensity_range[1]"
  b_min: "$@intensity_range[0]"
  b_max: "$@intensity_range[1]"
  clip: true
- _target_: msam_components.transforms.NormalizeIntensityAboved
  keys: image
  threshold: 0.0""",
    preprocessing_comment="CT clip to [-1000, 1000], z-score over voxels > 0 HU (reference)",
    image_classes="single channel CT, clipped to [-1000, 1000] HU and z-scored per image, 1.5 mm isotropic",
    preprocessing_bullet="""\
- Preprocessing: RAS orientation, 1.5 mm isotropic resampling (bilinear image, nearest label), CT clipped to
  [-1000, 1000] HU, z-score with the statistics of voxels above 0 HU (the reference code's normalisation, per image),
  a lesion-centred 128^3 crop-or-pad (random jitter of +-8 voxels in training) and random flips on all three axes. The
  deterministic part is cached (`CacheDataset`, `cache_rate`).""",
)

MR = Modality(
    name="MR",
    intensity_settings="",
    intensity_transforms="""\
- _target_: NormalizeIntensityd
  keys: image
  nonzero: true""",
    preprocessing_comment="z-score over the non-zero voxels",
    image_classes="single channel MRI, z-scored over the non-zero voxels, 1.5 mm isotropic",
    preprocessing_bullet="""\
- Preprocessing: RAS orientation, 1.5 mm isotropic resampling, z-score over the non-zero voxels, a lesion-centred
  128^3 crop-or-pad (random jitter of +-8 voxels in training) and random flips on all three axes; the deterministic
  part is cached.""",
)

MODALITIES: dict[str, Modality] = {m.name: m for m in (CT, MR)}

SPLIT_BULLET = """\
- Split: deterministic 80/20 by case id (`seed`, `val_fraction`), written to `<output_dir>/fold.json` and reused on
  later runs."""


def wrap(text: str, bullet: bool = False) -> str:
    """Wrap Markdown prose at 120 columns (a bullet's continuation lines indented by 2), as the bundle docs are."""
    body = " ".join(text.split())
    if bullet:
        return textwrap.fill(f"- {body}", 120, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
    return textwrap.fill(body, 120, break_on_hyphens=False, break_long_words=False)


def format_labels(labels: tuple[int, ...]) -> str:
    """Return label values as the YAML/JSON flow list the configs use, e.g. ``[1, 2, 4]``."""
    return "[" + ", ".join(str(v) for v in labels) + "]"


@dataclass(frozen=True)
class BundleSpec:
    """The answers that describe one interactive tumour-segmentation task; one field per place it appears."""

    name: str  # bundle folder name, e.g. "msam_lits"
    dataset: str  # short dataset name used in texts, e.g. "LiTS"
    modality: str  # key of MODALITIES: "CT" or "MR"
    target_labels: tuple[int, ...]  # label values merged into the binary target
    datalist: str  # YAML value of the `datalist` config item (an expression or a `_target_` flow mapping)
    config_title: str  # train.yaml: "# M-SAM on <config_title>: training with 10 simulated clicks per case."
    data_comment: str  # train.yaml: "# ---- data: <data_comment> ----"
    readme_title: str  # docs/README.md: "# M-SAM for <readme_title>"
    display_name: str  # metadata name: "M-SAM <display_name>"
    task: str  # metadata task
    changelog_task: str  # metadata changelog: "first release: M-SAM (...) for <changelog_task>"
    data_source: str  # metadata data_source
    label_classes: str  # metadata label_classes
    example_dataset_dir: str  # command examples; the config default is "/workspace" + this
    example_image_path: str  # inference command examples
    readme_data_intro: str  # README "Data" paragraph before the layout block, wrapped at 120 columns
    readme_layout: tuple[str, ...]  # lines of the README layout code block (a "..." line is appended)
    readme_data_bullets: tuple[str, ...]  # README "Data" bullets, each wrapped at 120 columns
    dataset_references: tuple[str, ...] = ()  # metadata references after the M-SAM and SAM-Med3D papers
    dataset_bibtex: str = ""  # README citation entries after the M-SAM and SAM-Med3D ones
    data_settings: str = ""  # extra train.yaml lines above `target_labels` (e.g. BraTS' `modality: flair`)
    preprocessing_comment: str | None = None  # None: the modality's
    image_classes: str | None = None  # None: the modality's
    license_data_notice: str | None = None  # None: "<dataset> is distributed under its own terms; ..."
    label_values: tuple[int, ...] | None = None  # every value the label maps may hold (0 included); None: unchecked

    def __post_init__(self) -> None:
        """Refuse answers that would render a broken bundle, naming the field at fault."""
        if not _NAME.match(self.name):
            raise ValueError(
                f"bundle name {self.name!r} must be lower case letters, digits and '_', starting with a letter"
            )
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {sorted(MODALITIES)}")
        labels = self.target_labels
        if not labels or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in labels):
            raise ValueError(f"target_labels must be positive integers, got {labels!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"target_labels lists a value twice: {labels!r}")
        values = self.label_values
        if values is not None and (0 not in values or not set(labels) <= set(values)):
            raise ValueError(f"label_values {values!r} must hold 0 (background) and every target label {labels!r}")
        for field in _ONE_LINE_FIELDS:
            value = getattr(self, field)
            if not value.strip() or "\n" in value:
                raise ValueError(f"{field} must be one non-empty line, got {value!r}")


def _data_section(spec: BundleSpec) -> str:
    """Compose the README "Data" section body: intro paragraph, layout code block, bullets."""
    layout = "\n".join((*spec.readme_layout, "..."))
    return f"{spec.readme_data_intro}\n\n```\n{layout}\n```\n\n" + "\n".join(spec.readme_data_bullets)


def placeholder_values(spec: BundleSpec) -> dict[str, str | list[str]]:
    """Return the value of every `{{placeholder}}` of bundle_template/ for a spec (lists only for JSON files)."""
    modality = MODALITIES[spec.modality]
    notice = spec.license_data_notice or (
        f"{spec.dataset} is distributed under its own terms; nothing of it is included here."
    )
    return {
        "config_title": spec.config_title,
        "example_dataset_dir": spec.example_dataset_dir,
        "default_dataset_dir": f"/workspace{spec.example_dataset_dir}",
        "data_comment": spec.data_comment,
        "data_settings": spec.data_settings,
        "target_labels": format_labels(spec.target_labels),
        "label_values": "null" if spec.label_values is None else format_labels(spec.label_values),
        "intensity_settings": modality.intensity_settings,
        "datalist": spec.datalist,
        "preprocessing_comment": spec.preprocessing_comment or modality.preprocessing_comment,
        "intensity_transforms": modality.intensity_transforms,
        "example_image_path": spec.example_image_path,
        "license_data_notice": notice,
        "changelog_task": spec.changelog_task,
        "display_name": spec.display_name,
        "task": spec.task,
        "data_source": spec.data_source,
        "image_classes": spec.image_classes or modality.image_classes,
        "label_classes": spec.label_classes,
        "dataset_references": list(spec.dataset_references),
        "modality": modality.name,
        "readme_title": spec.readme_title,
        "data_section": _data_section(spec),
        "dataset": spec.dataset,
        "dataset_bibtex": spec.dataset_bibtex,
    }
