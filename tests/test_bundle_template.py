"""bundle_template/ and its generator: no drift from the hand-made bundles, model-zoo conformity of every bundle, and
each generated preset trained, evaluated and run through ConfigWorkflow on tiny synthetic data in its own layout."""

from __future__ import annotations

import csv
import difflib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow, verify_metadata

from msam_components.bundle_tools import PRESET_NAMES, generic_spec, preset_spec, render_bundle
from msam_components.bundle_tools.new_bundle import main as new_bundle_main
from msam_components.bundle_tools.template import RERENDER_COMMAND, TEMPLATE_DIR, render_files, render_json, render_text
from msam_components.data import (
    imagestr_labelstr_datalist,
    make_imagestr_like,
    make_msd_like,
    msd_datalist,
)
from msam_components.data.lits import lits_datalist, make_lits_like

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
HAND_MADE = {"kits19": "msam_kits19", "brats21": "msam_brats21"}
# Files a hand-made bundle may have that the template does not produce (bundle-specific by design).
BUNDLE_ONLY_FILES: dict[str, set[str]] = {"msam_kits19": set(), "msam_brats21": set()}
README_SECTIONS = ("Model Description", "Data", "Performance", "System Configuration", "Limitations", "Citation")
GENERIC_ARGS = ["--preset", "generic", "--name", "msam_inhouse", "--label", "2", "--modality", "MR"]
TINY = dict(shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=0)
# On top of the tiny overlay: a 4^3 token grid. A preset changes the data side (layout, labels, intensity block), not
# the network, which test_bundles.py runs at the overlay's size; this keeps each preset's three runs to seconds.
FAST = {"network_def#patch_size": 8, "network_def#encoder_window_size": 4}

# Each generated preset's tiny dataset in its own layout: (writer, datalist builder, tumour label values).
LAYOUTS: dict[str, tuple[Callable[[Path], object], Callable[[Path], list], tuple[int, ...]]] = {
    "lits": (lambda d: make_lits_like(d, num_cases=5, **TINY), lits_datalist, (2,)),
    **{
        preset: (
            lambda d, label=label: make_msd_like(d, num_cases=5, num_test=0, tumour_label=label, **TINY),
            msd_datalist,
            (label,),
        )
        for preset, label in [
            ("msd_task03_liver", 2),
            ("msd_task06_lung", 1),
            ("msd_task07_pancreas", 2),
            ("msd_task08_hepaticvessel", 2),
        ]
    },
    "generic": (lambda d: make_imagestr_like(d, num_cases=5, tumour_label=2, **TINY), imagestr_labelstr_datalist, (2,)),
}


def _bundle_files(folder: Path) -> set[str]:
    """The files a bundle ships (configs, docs, LICENSE, models/.gitkeep), not weights or run outputs."""
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return {f for f in files if f.split("/")[0] in ("configs", "docs", "LICENSE") or f == "models/.gitkeep"}


def _mask_performance(readme: str) -> str:
    """Replace the body of the README's Performance section, which holds each bundle's own numbers."""
    return re.sub(r"(?s)(\n## Performance\n).*?(?=\n## )", r"\1\n<performance>\n", readme)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One bundle per preset, rendered into a temporary folder (generic through the command line)."""
    out = tmp_path_factory.mktemp("generated")
    bundles = {p: render_bundle(preset_spec(p), out) for p in PRESET_NAMES if p != "generic"}
    assert new_bundle_main([*GENERIC_ARGS, "--output", str(out)]) == 0
    bundles["generic"] = out / "msam_inhouse"
    return bundles


# --- drift: the template reproduces the hand-made bundles -----------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(HAND_MADE))
def test_template_reproduces_hand_made_bundle(preset: str, generated: dict[str, Path]) -> None:
    """Every template file renders to the bundle's file byte for byte (README: all but the Performance body)."""
    bundle, rendered = REPO / "bundles" / HAND_MADE[preset], generated[preset]
    bundle_files, rendered_files = _bundle_files(bundle), _bundle_files(rendered)
    assert rendered_files <= bundle_files, f"missing in {bundle}: {sorted(rendered_files - bundle_files)}"
    assert bundle_files - rendered_files == BUNDLE_ONLY_FILES[bundle.name], "a bundle file the template lacks"
    for relative in sorted(rendered_files):
        expected = (bundle / relative).read_text(encoding="utf-8")
        actual = (rendered / relative).read_text(encoding="utf-8")
        if relative == "docs/README.md":
            expected, actual = _mask_performance(expected), _mask_performance(actual)
        if actual != expected:
            diff = "".join(
                difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "bundle", "template")
            )
            pytest.fail(
                f"{bundle.name}/{relative} drifted from bundle_template/ (bundle files are rendered: edit the template,"
                f" then run `{RERENDER_COMMAND.replace('<preset>', preset)}`):\n{diff[:3000]}"
            )


def test_rendered_files_name_their_template(generated: dict[str, Path]) -> None:
    """Every rendered config and README opens with a line naming its template and the re-render command."""
    for relative, content in render_files(preset_spec("kits19")).items():
        if relative.endswith((".yaml", ".conf", ".md")):
            first = content.split("\n", 1)[0]
            assert f"rendered from bundle_template/{relative}" in first and "--force" in first, (relative, first)
        else:
            assert "rendered from" not in content, relative  # JSON takes no comment; a licence stays verbatim


def test_rerendering_keeps_the_bundles_own_performance_numbers(tmp_path: Path) -> None:
    """--force replaces the template's text and keeps the body of the README's Performance section."""
    bundle = render_bundle(preset_spec("lits"), tmp_path)
    readme = bundle / "docs" / "README.md"
    text = readme.read_text(encoding="utf-8")
    measured = "\n| Dice | 0.123 |\n"
    readme.write_text(re.sub(r"(?s)(\n## Performance\n).*?(?=\n## )", lambda m: m.group(1) + measured, text))
    (bundle / "configs" / "train.yaml").write_text("edited by hand\n")
    render_bundle(preset_spec("lits"), tmp_path, force=True)
    again = readme.read_text(encoding="utf-8")
    assert "\n## Performance\n" + measured + "\n## " in again
    assert _mask_performance(again) == _mask_performance(text)
    assert (bundle / "configs" / "train.yaml").read_text().startswith("# rendered from bundle_template/configs/train")


# --- model-zoo conformity of every bundle ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", [*sorted(HAND_MADE.values()), *[f"generated/{p}" for p in PRESET_NAMES]])
def test_bundle_conforms_to_model_zoo(which: str, generated: dict[str, Path], schema_dir: Path, tmp_path: Path) -> None:
    """Required files, a changelog entry for the version, a schema-valid metadata, 4-space JSON, small files, README."""
    bundle = generated[which.split("/")[1]] if which.startswith("generated/") else REPO / "bundles" / which
    for required in ("configs/metadata.json", "configs/inference.yaml", "docs/README.md", "LICENSE"):
        assert (bundle / required).is_file(), f"{which}: {required} is missing"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["version"] in meta["changelog"]
    schema = tmp_path / "schema.json"  # a copy: verify_metadata may write next to --filepath
    shutil.copyfile(schema_dir / "meta_schema_20240725.json", schema)
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    for path in bundle.rglob("*"):
        if path.is_file():
            assert path.stat().st_size <= 1024 * 1024, f"{path} is over 1 MB"
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8")
            assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n", f"{path}: not indent 4"
    headings = re.findall(r"^## (.+)$", (bundle / "docs" / "README.md").read_text(encoding="utf-8"), flags=re.M)
    assert [h for h in headings if h in README_SECTIONS] == list(README_SECTIONS), headings


def test_generated_texts_fit_the_presets(generated: dict[str, Path]) -> None:
    """Each generated bundle carries its own labels, modality block and datalist, and no placeholder is left."""
    for preset, bundle in generated.items():
        spec = preset_spec(preset) if preset != "generic" else generic_spec("msam_inhouse", [2], "MR")
        train = (bundle / "configs" / "train.yaml").read_text(encoding="utf-8")
        assert f"target_labels: [{', '.join(map(str, spec.target_labels))}]" in train
        assert f"datalist: {spec.datalist}\n" in train
        assert ("ScaleIntensityRanged" in train) == (spec.modality == "CT")
        assert ("NormalizeIntensityd" in train) == (spec.modality == "MR")
        for path in bundle.rglob("*"):
            assert not path.is_file() or "{{" not in path.read_text(encoding="utf-8"), path
        readme = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
        data = readme.split("## Data\n", 1)[1].split("\n## ", 1)[0]
        assert max(len(line) for line in data.splitlines()) <= 120, f"{preset}: Data section over 120 columns"


# --- the generator's behaviour ---------------------------------------------------------------------------------------


def test_generator_refuses_existing_bundle_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An existing folder is refused; --force rewrites the template's files and keeps the others (e.g. weights)."""
    args = ["--preset", "lits", "--output", str(tmp_path)]
    assert new_bundle_main(args) == 0
    bundle = tmp_path / "msam_lits"
    (bundle / "configs" / "train.yaml").write_text("edited\n")
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    assert new_bundle_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (bundle / "configs" / "train.yaml").read_text() == "edited\n"
    assert new_bundle_main([*args, "--force"]) == 0
    assert (bundle / "configs" / "train.yaml").read_text() != "edited\n"
    assert (bundle / "models" / "model.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msam_lits"], "a staging folder was left behind"


def test_generator_writes_nothing_when_rendering_fails(tmp_path: Path) -> None:
    """A template with an unknown placeholder fails before anything is written, even the output folder."""
    template = tmp_path / "template"
    shutil.copytree(TEMPLATE_DIR, template)
    (template / "configs" / "extra.yaml").write_text("value: {{no_such_answer}}\n")
    output = tmp_path / "out"
    with pytest.raises(KeyError, match="no_such_answer"):
        render_bundle(preset_spec("lits"), output, template=template)
    assert not output.exists()


def test_generator_command_line_checks_answers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """generic needs a name, labels and a modality; fixed presets refuse generic answers; --name renames a preset."""
    assert new_bundle_main(["--preset", "generic", "--name", "msam_x", "--output", str(tmp_path)]) == 2
    assert "--label" in capsys.readouterr().err
    assert new_bundle_main(["--preset", "kits19", "--label", "1", "--output", str(tmp_path)]) == 2
    assert "only for --preset generic" in capsys.readouterr().err
    assert new_bundle_main(["--preset", "kits19", "--name", "msam_kidney", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "msam_kidney" / "configs" / "train.yaml").is_file()
    with pytest.raises(ValueError, match="bundle name"):
        generic_spec("Bad Name", [2], "CT")
    with pytest.raises(ValueError, match="target_labels"):
        generic_spec("msam_x", [0], "CT")


def test_renderer_blocks_inline_and_json() -> None:
    """Block placeholders take the line's indent (empty removes the line); JSON lists splice; unused answers fail."""
    values = {"block": "a: 1\nb: 2", "empty": "", "word": "x", "refs": ["r1", "r2"]}
    assert render_text("k:\n  {{block}}\n{{empty}}\nv: {{ word }}", values) == "k:\n  a: 1\n  b: 2\nv: x"
    rendered = json.loads(render_json('{"n": "M-SAM {{word}}", "r": ["r0", "{{refs}}"]}', values))
    assert rendered == {"n": "M-SAM x", "r": ["r0", "r1", "r2"]}
    with pytest.raises(ValueError, match="not one line"):
        render_text("v: {{block}}", values)


def test_renderer_refuses_unused_answers(tmp_path: Path) -> None:
    """A template that leaves an answer unused fails: template and spec must stay in step."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.yaml").write_text("target_labels: {{target_labels}}\n")
    with pytest.raises(ValueError, match="uses none of these answers: .*datalist"):
        render_files(preset_spec("lits"), template=tmp_path)


def test_lits_datalist_layout(tmp_path: Path) -> None:
    """volume-N/segmentation-N pairs sorted by N, batch subfolders, and clear errors for missing or double cases."""
    for folder, index in [(tmp_path, 10), (tmp_path, 2), (tmp_path / "Training Batch 2", 7)]:
        folder.mkdir(exist_ok=True)
        (folder / f"volume-{index}.nii").write_bytes(b"")
        (folder / f"segmentation-{index}.nii").write_bytes(b"")
    datalist = lits_datalist(tmp_path)
    assert [d["case"] for d in datalist] == ["volume-2", "volume-7", "volume-10"]
    assert datalist[1]["label"] == str(tmp_path / "Training Batch 2" / "segmentation-7.nii")
    (tmp_path / "volume-11.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="volume-11 has no label"):
        lits_datalist(tmp_path)
    assert lits_datalist(tmp_path, require_label=False)[-1] == {
        "image": str(tmp_path / "volume-11.nii.gz"),
        "case": "volume-11",
    }
    (tmp_path / "Training Batch 2" / "volume-2.nii").write_bytes(b"")
    with pytest.raises(ValueError, match="found twice"):
        lits_datalist(tmp_path)
    with pytest.raises(FileNotFoundError, match="LiTS layout"):
        lits_datalist(tmp_path / "missing")


# --- generated presets run end to end --------------------------------------------------------------------------------


def _workflow(bundle: Path, files: list[Path], workflow_type: str, run_id: str, **override: object) -> ConfigWorkflow:
    """Initialise a ConfigWorkflow over a generated bundle's configs plus the tiny test overlay."""
    configs = [str(bundle / "configs" / f) if isinstance(f, str) else str(f) for f in files]
    meta = str(bundle / "configs" / "metadata.json")
    override = {**FAST, **override}
    wf = ConfigWorkflow(config_file=configs, meta_file=meta, workflow_type=workflow_type, run_id=run_id, **override)
    wf.initialize()
    assert not wf.check_properties(), f"{bundle.name}: missing bundle properties"
    return wf


def _lesion_click(seg_path: str, values: tuple[int, ...]) -> list[int]:
    """The lesion voxel nearest the lesion centroid, in on-disk voxel indices."""
    voxels = np.argwhere(np.isin(np.asarray(nib.load(seg_path).dataobj), values))
    return [int(v) for v in voxels[np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1))]]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def trained(request: pytest.FixtureRequest, generated: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Train each generated preset for one tiny epoch on 5 synthetic cases in its own layout."""
    preset = request.param
    root = tmp_path_factory.mktemp(preset)
    LAYOUTS[preset][0](root / "data")
    bundle = generated[preset]
    paths = dict(bundle_root=str(bundle), dataset_dir=str(root / "data"), ckpt_dir=str(root / "models"))
    wf = _workflow(bundle, ["train.yaml", SMALL], "train", "training", output_dir=str(root / "eval"), **paths)
    wf.run()
    wf.finalize()
    return {"preset": preset, "bundle": bundle, "root": root, "paths": paths}


def test_generated_training_writes_checkpoint_and_fold(trained: dict) -> None:
    root = trained["root"]
    assert (root / "models" / "model.pt").is_file()
    fold = json.loads((root / "eval" / "fold.json").read_text())
    assert len(fold["train"]) == 4 and len(fold["validation"]) == 1


def test_generated_evaluate_writes_per_click_reports(trained: dict) -> None:
    root, out = trained["root"], trained["root"] / "evaluation"
    files = ["train.yaml", "evaluate.yaml", SMALL]
    ckpt = str(root / "models" / "model.pt")
    wf = _workflow(
        trained["bundle"], files, "train", "evaluating", ckpt_path=ckpt, output_dir=str(out), **trained["paths"]
    )
    wf.run()
    wf.finalize()
    rows = list(csv.DictReader((out / "click_metrics.csv").open()))
    assert len(rows) == 1 and sum(k.startswith("dice_click_") for k in rows[0]) == 3
    assert {"dice_last_click", "iou_last_click"} <= set(json.loads((out / "metrics.json").read_text()))


def test_generated_inference_writes_mask_in_input_geometry(trained: dict) -> None:
    preset, root = trained["preset"], trained["root"]
    _, datalist_builder, values = LAYOUTS[preset]
    case = json.loads((root / "eval" / "fold.json").read_text())["validation"][0]
    item = next(d for d in datalist_builder(root / "data") if d["case"] == case)
    out = root / "inference"
    wf = _workflow(
        trained["bundle"],
        ["inference.yaml", SMALL],
        "infer",
        "run",
        bundle_root=str(trained["bundle"]),
        image_path=item["image"],
        foreground=[_lesion_click(item["label"], values)],
        background=[],
        ckpt_path=str(root / "models" / "model.pt"),
        output_dir=str(out),
    )
    wf.run()
    wf.finalize()
    written = list(out.glob("*_seg.nii*"))
    assert len(written) == 1
    result, source = nib.load(str(written[0])), nib.load(item["image"])
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(result.dataobj))) <= {0, 1}
