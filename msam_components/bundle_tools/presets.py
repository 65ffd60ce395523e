"""The tasks the generator knows: the two hand-made bundles (kept in sync by a test), LiTS, four MSD tasks, generic.

Every README text here is Markdown already wrapped at 120 columns, exactly as it appears in the rendered bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .spec import CT, MODALITIES, MR, SPLIT_BULLET, BundleSpec, format_labels, wrap

__all__ = ["FIXED_PRESETS", "PRESET_NAMES", "generic_spec", "preset_spec"]

_LICENSE_KITS_BRATS = "KiTS19 and BraTS 2021 are distributed under their own terms; nothing of them is included here."

KITS19 = BundleSpec(
    name="msam_kits19",
    dataset="KiTS19",
    modality="CT",
    target_labels=(2,),
    label_values=(0, 1, 2),  # background, kidney, tumour
    datalist="$msam_components.data.dataset_json_or(msam_components.data.kits19_datalist, @dataset_dir)",
    config_title="KiTS19 kidney tumours",
    data_comment="official KiTS19 layout, tumour = label 2",
    readme_title="interactive kidney-tumour segmentation (KiTS19)",
    display_name="KiTS19 kidney tumour",
    task="Interactive (click-driven) kidney tumour segmentation in CT",
    changelog_task="interactive KiTS19 kidney-tumour segmentation",
    data_source="KiTS19 challenge, https://kits19.grand-challenge.org/ "
    "(210 training cases with kidney and tumour labels)",
    label_classes="binary: 1 = kidney tumour (KiTS19 label 2), 0 = everything else",
    example_dataset_dir="/data/kits19",
    example_image_path="/data/case_00123/imaging.nii.gz",
    readme_data_intro="""\
[KiTS19](https://kits19.grand-challenge.org/): 210 contrast-enhanced abdominal CT scans with kidney (label 1) and
tumour (label 2) annotations. The bundle reads the official layout directly:""",
    readme_layout=("<dataset_dir>/case_00000/imaging.nii.gz", "<dataset_dir>/case_00000/segmentation.nii.gz"),
    readme_data_bullets=(
        "- Target: tumour only (`target_labels: [2]`); `[1, 2]` would segment kidney and tumour together.",
        """\
- Split: deterministic 80/20 by case id (`seed`, `val_fraction`), written to `<output_dir>/fold.json` and reused on
  later runs. Cases without a segmentation (the challenge's test cases) are skipped.""",
        CT.preprocessing_bullet,
    ),
    dataset_references=("Heller, N. et al. The KiTS19 Challenge Data. arXiv:1904.00445",),
    dataset_bibtex="""\
@article{heller2019kits19,
  title={The KiTS19 Challenge Data: 300 Kidney Tumor Cases with Clinical Context, CT Semantic Segmentations, and Surgical Outcomes},
  author={Heller, Nicholas and others},
  journal={arXiv preprint arXiv:1904.00445},
  year={2019}
}""",
    license_data_notice=_LICENSE_KITS_BRATS,
)

BRATS21 = BundleSpec(
    name="msam_brats21",
    dataset="BraTS 2021",
    modality="MR",
    target_labels=(1, 2, 4),
    label_values=(0, 1, 2, 4),  # background, necrotic core, edema, enhancing tumour
    datalist="$msam_components.data.dataset_json_or(msam_components.data.brats21_datalist, @dataset_dir, modality=@modality)",
    config_title="BraTS 2021 gliomas (whole tumour on FLAIR)",
    data_comment="official BraTS 2021 layout <case>/<case>_<modality>.nii.gz; whole tumour = labels 1, 2, 4",
    readme_title="interactive glioma whole-tumour segmentation (BraTS 2021)",
    display_name="BraTS 2021 whole tumour",
    task="Interactive (click-driven) glioma whole-tumour segmentation in MRI (FLAIR)",
    changelog_task="interactive BraTS 2021 whole-tumour segmentation on FLAIR",
    data_source="BraTS 2021 (RSNA-ASNR-MICCAI Brain Tumor Segmentation challenge), https://www.synapse.org/brats2021",
    label_classes="binary: 1 = whole tumour (BraTS labels 1, 2 and 4), 0 = everything else",
    example_dataset_dir="/data/brats2021",
    example_image_path="/data/BraTS2021_00000/BraTS2021_00000_flair.nii.gz",
    readme_data_intro="""\
[BraTS 2021](https://www.synapse.org/brats2021): multi-parametric brain MRI (T1, T1ce, T2, FLAIR) of gliomas with
labels 1 (necrotic / non-enhancing core), 2 (edema) and 4 (enhancing tumour). The bundle reads the official layout:""",
    readme_layout=(
        "<dataset_dir>/BraTS2021_00000/BraTS2021_00000_flair.nii.gz   (and _t1, _t1ce, _t2)",
        "<dataset_dir>/BraTS2021_00000/BraTS2021_00000_seg.nii.gz",
    ),
    readme_data_bullets=(
        """\
- Modality: one channel (the encoder takes one), `modality: flair` by default (as in M-SAM's data list); `t1`, `t1ce`
  or `t2` are config values. A case missing the requested modality stops with an error naming the case and the file.""",
        "- Target: whole tumour (`target_labels: [1, 2, 4]`); tumour core is `[1, 4]`, enhancing tumour `[4]`.",
        "- Split: deterministic 80/20 by case id (`seed`, `val_fraction`), written to `<output_dir>/fold.json` and "
        "reused.",
        """\
- Preprocessing: RAS orientation, 1.5 mm isotropic resampling, z-score over the non-zero (brain) voxels, a
  lesion-centred 128^3 crop-or-pad (random jitter of +-8 voxels in training) and random flips on all three axes; the
  deterministic part is cached.""",
    ),
    dataset_references=(
        "Baid, U. et al. The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and Radiogenomic "
        "Classification. arXiv:2107.02314",
    ),
    dataset_bibtex="""\
@article{baid2021brats,
  title={The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and Radiogenomic Classification},
  author={Baid, Ujjwal and others},
  journal={arXiv preprint arXiv:2107.02314},
  year={2021}
}""",
    data_settings="""\
# one modality (the encoder takes one channel): flair (default), t1, t1ce or t2; tumour core = [1, 4], enhancing = [4]
modality: flair""",
    preprocessing_comment="z-score over the non-zero (brain) voxels",
    image_classes="single channel MRI (FLAIR by default), z-scored over the non-zero brain voxels, 1.5 mm isotropic",
    license_data_notice=_LICENSE_KITS_BRATS,
)

LITS = BundleSpec(
    name="msam_lits",
    dataset="LiTS",
    modality="CT",
    target_labels=(2,),
    label_values=(0, 1, 2),  # background, liver, tumour
    # a component, so that pydoc imports msam_components.data.lits (msam_components.data does not re-export it)
    datalist="$msam_components.data.dataset_json_or(msam_components.data.lits_datalist, @dataset_dir)",
    config_title="LiTS liver tumours",
    data_comment="official LiTS layout volume-<N>.nii + segmentation-<N>.nii, tumour = label 2",
    readme_title="interactive liver-tumour segmentation (LiTS)",
    display_name="LiTS liver tumour",
    task="Interactive (click-driven) liver tumour segmentation in CT",
    changelog_task="interactive LiTS liver-tumour segmentation",
    data_source="LiTS (Liver Tumor Segmentation Benchmark), https://competitions.codalab.org/competitions/17094 "
    "(131 training CT scans with liver and tumour labels)",
    label_classes="binary: 1 = liver tumour (LiTS label 2), 0 = everything else",
    example_dataset_dir="/data/lits",
    example_image_path="/data/lits/volume-0.nii",
    readme_data_intro="""\
[LiTS](https://competitions.codalab.org/competitions/17094): 131 contrast-enhanced abdominal CT scans with liver
(label 1) and liver tumour (label 2) annotations. The bundle reads the official layout directly:""",
    readme_layout=("<dataset_dir>/volume-0.nii", "<dataset_dir>/segmentation-0.nii"),
    readme_data_bullets=(
        "- Target: tumour only (`target_labels: [2]`); `[1, 2]` would segment liver and tumour together.",
        """\
- Layout: the two official training batches may stay in two subfolders of `dataset_dir`; `.nii.gz` files work too. A
  volume without its segmentation stops with an error naming the case.""",
        SPLIT_BULLET,
        CT.preprocessing_bullet,
    ),
    dataset_references=(
        "Bilic, P. et al. The Liver Tumor Segmentation Benchmark (LiTS). Medical Image Analysis 84, 102680 (2023). "
        "arXiv:1901.04056",
    ),
    dataset_bibtex="""\
@article{bilic2023lits,
  title={The Liver Tumor Segmentation Benchmark (LiTS)},
  author={Bilic, Patrick and others},
  journal={Medical Image Analysis},
  volume={84},
  pages={102680},
  year={2023}
}""",
)

_MSD_REFERENCE = (
    "Antonelli, M. et al. The Medical Segmentation Decathlon. Nature Communications 13, 4128 (2022). arXiv:2106.05735"
)
_MSD_BIBTEX = """\
@article{antonelli2022msd,
  title={The Medical Segmentation Decathlon},
  author={Antonelli, Michela and others},
  journal={Nature Communications},
  volume={13},
  pages={4128},
  year={2022}
}"""


def _msd_spec(
    task: str, tumour: str, labels: str, tumour_label: int, example: str, label_values: tuple[int, ...]
) -> BundleSpec:
    """Describe one CT task of the Medical Segmentation Decathlon, read through its dataset.json."""
    short = f"MSD {task}"
    target = format_labels((tumour_label,))
    return BundleSpec(
        name=f"msam_msd_{task.lower()}",
        dataset=short,
        modality="CT",
        target_labels=(tumour_label,),
        label_values=label_values,
        datalist="$msam_components.data.msd_datalist(@dataset_dir)",
        config_title=f"{tumour}s ({short})",
        data_comment=f"{short} dataset.json (imagesTr/, labelsTr/), tumour = label {tumour_label}",
        readme_title=f"interactive {tumour.replace(' ', '-')} segmentation ({short})",
        display_name=f"{short} {tumour}",
        task=f"Interactive (click-driven) {tumour} segmentation in CT",
        changelog_task=f"interactive {short} {tumour.replace(' ', '-')} segmentation",
        data_source=f"Medical Segmentation Decathlon {task}, http://medicaldecathlon.com/ (CT with {labels})",
        label_classes=f"binary: 1 = {tumour} ({short} label {tumour_label}), 0 = everything else",
        example_dataset_dir=f"/data/{task}",
        example_image_path=f"/data/{task}/imagesTr/{example}",
        readme_data_intro=wrap(
            f"[Medical Segmentation Decathlon](http://medicaldecathlon.com/) {task}: CT scans with {labels}. The "
            "bundle reads the task's `dataset.json` (its `training` section, paths relative to the file):"
        ),
        readme_layout=(
            "<dataset_dir>/dataset.json",
            f"<dataset_dir>/imagesTr/{example}",
            f"<dataset_dir>/labelsTr/{example}",
        ),
        readme_data_bullets=(
            wrap(f"Target: {tumour} only (`target_labels: {target}`); every other label is background.", bullet=True),
            SPLIT_BULLET,
            CT.preprocessing_bullet,
        ),
        dataset_references=(_MSD_REFERENCE,),
        dataset_bibtex=_MSD_BIBTEX,
        license_data_notice=(
            "The Medical Segmentation Decathlon data is distributed under its own terms (CC BY-SA 4.0); nothing of it "
            "is included here."
        ),
    )


FIXED_PRESETS: dict[str, BundleSpec] = {
    "kits19": KITS19,
    "brats21": BRATS21,
    "lits": LITS,
    "msd_task03_liver": _msd_spec(
        "Task03_Liver", "liver tumour", "labels 1 (liver) and 2 (cancer)", 2, "liver_0.nii.gz", (0, 1, 2)
    ),
    "msd_task06_lung": _msd_spec("Task06_Lung", "lung tumour", "label 1 (cancer)", 1, "lung_001.nii.gz", (0, 1)),
    "msd_task07_pancreas": _msd_spec(
        "Task07_Pancreas",
        "pancreatic tumour",
        "labels 1 (pancreas) and 2 (cancer)",
        2,
        "pancreas_001.nii.gz",
        (0, 1, 2),
    ),
    "msd_task08_hepaticvessel": _msd_spec(
        "Task08_HepaticVessel",
        "liver tumour",
        "labels 1 (hepatic vessel) and 2 (tumour)",
        2,
        "hepaticvessel_001.nii.gz",
        (0, 1, 2),
    ),
}
PRESET_NAMES: tuple[str, ...] = (*FIXED_PRESETS, "generic")


def generic_spec(
    name: str,
    target_labels: Sequence[int],
    modality: str,
    dataset: str | None = None,
    task: str | None = None,
    description: str | None = None,
) -> BundleSpec:
    """Describe an in-house task in the nnU-Net-like imagesTr/labelsTr layout from a few answers."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {sorted(MODALITIES)}")
    labels = tuple(int(v) for v in target_labels)
    dataset = dataset or name.removeprefix("msam_")
    listed = format_labels(labels)
    plural = "labels" if len(labels) > 1 else "label"
    values = ", ".join(str(v) for v in labels)
    scan = "CT" if modality == "CT" else "MRI"
    folder = f"/data/{name.removeprefix('msam_')}"
    intro = (
        description or f"{dataset}: {scan} volumes with lesion annotations. The bundle reads an nnU-Net-like layout:"
    )
    return BundleSpec(
        name=name,
        dataset=dataset,
        modality=modality,
        target_labels=labels,
        datalist="$msam_components.data.dataset_json_or(msam_components.data.imagestr_labelstr_datalist, @dataset_dir)",
        config_title=f"{dataset} lesions",
        data_comment=f"imagesTr/<case>[_0000].nii.gz + labelsTr/<case>.nii.gz, tumour = {plural} {values}",
        readme_title=f"interactive lesion segmentation ({dataset})",
        display_name=f"{dataset} lesion",
        task=task or f"Interactive (click-driven) lesion segmentation in {scan}",
        changelog_task=f"interactive {dataset} lesion segmentation",
        data_source=f"{dataset}: imagesTr/ and labelsTr/ under dataset_dir (not distributed with this bundle)",
        label_classes=f"binary: 1 = lesion ({plural} {values}), 0 = everything else",
        example_dataset_dir=folder,
        example_image_path=f"{folder}/imagesTr/case_000_0000.nii.gz",
        readme_data_intro=wrap(intro),
        readme_layout=(
            "<dataset_dir>/imagesTr/case_000_0000.nii.gz   (or case_000.nii.gz; _0001... for further channels)",
            "<dataset_dir>/labelsTr/case_000.nii.gz",
        ),
        readme_data_bullets=(
            wrap(f"Target: {plural} {values} (`target_labels: {listed}`); every other label is background.", True),
            SPLIT_BULLET,
            (CT if modality == "CT" else MR).preprocessing_bullet,
        ),
    )


def preset_spec(preset: str, name: str | None = None) -> BundleSpec:
    """Return a fixed preset's spec, renamed when a bundle name is given (use generic_spec for 'generic')."""
    if preset not in FIXED_PRESETS:
        hint = " (call generic_spec with labels and a modality)" if preset == "generic" else ""
        raise KeyError(f"unknown preset {preset!r}{hint}; known: {', '.join(PRESET_NAMES)}")
    spec = FIXED_PRESETS[preset]
    if name is None or name == spec.name:
        return spec
    return replace(spec, name=name)
