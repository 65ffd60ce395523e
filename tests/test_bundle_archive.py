"""Self-contained bundle archives: contents, limits, and the archived inference config run where msam_components is
not installed (a fresh interpreter that cannot see the editable install imports the copy inside the archive)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from msam_components.bundle_tools.archive import MAX_FILE_BYTES, build_archive, main, rewrite_config_for_archive
from msam_components.data import make_kits19_like

REPO = Path(__file__).resolve().parents[1]
KITS = REPO / "bundles" / "msam_kits19"
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"

# Runs in `python -I -S`: no site processing, so the editable install's .pth finder never loads; site-packages is put
# back on sys.path as a plain folder (monai, torch and their dependencies only). Prints a JSON report on its last line.
DRIVER = """
import importlib.util, json, runpy, sys
sys.path.append({site!r})
before = importlib.util.find_spec("msam_components")
sys.argv = ["monai.bundle", "run", "--config_file", {configs!r}, "--bundle_root", {bundle!r}, "--image_path", {image!r},
            "--foreground", {foreground!r}, "--background", "[]", "--ckpt_path", {ckpt!r}, "--output_dir", {out!r}]
try:
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    if stop.code not in (None, 0):
        raise
module = sys.modules.get("msam_components")
print(json.dumps({{"before": None if before is None else before.origin, "used": getattr(module, "__file__", None)}}))
"""


@pytest.fixture(scope="module")
def kits_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The KiTS19 bundle archived with the command line."""
    out = tmp_path_factory.mktemp("dist")
    assert main([str(KITS), "--output", str(out)]) == 0
    return out / f"msam_kits19_v{json.loads((KITS / 'configs' / 'metadata.json').read_text())['version']}.zip"


def test_archive_contents(kits_archive: Path) -> None:
    """Bundle files and the package source under scripts/; no weights, data, caches or files over 1 MB."""
    assert kits_archive.name == "msam_kits19_v0.1.0.zip"
    with zipfile.ZipFile(kits_archive) as archive:
        infos = archive.infolist()
        names = {i.filename for i in infos}
        meta = json.loads(archive.read("msam_kits19/configs/metadata.json"))
        train = yaml.safe_load(archive.read("msam_kits19/configs/train.yaml"))
    expected = {
        f"msam_kits19/{p}" for p in ("configs/inference.yaml", "configs/demo.yaml", "docs/README.md", "LICENSE")
    }
    assert expected | {"msam_kits19/models/.gitkeep", "msam_kits19/scripts/msam_components/__init__.py"} <= names
    assert "msam_kits19/scripts/msam_components/networks/msam.py" in names
    assert all(n.startswith("msam_kits19/") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pt", ".pth", ".nii", ".nii.gz"))]
    assert max(i.file_size for i in infos) <= MAX_FILE_BYTES
    assert "msam-components" not in meta["required_packages_version"]
    assert set(meta["exported_formats"]) == {"torchscript", "onnx"}
    assert meta["exported_formats"]["onnx"]["files"] == ["models/onnx/encoder.onnx", "models/onnx/decode_step.onnx"]
    assert "$import msam_components" not in train["imports"]
    assert train["initialize"][0] == "$import sys" and "sys.path.insert" in train["initialize"][1]
    assert train["initialize"][2] == "$import msam_components"


def test_archive_is_reproducible_and_skips_outputs(kits_archive: Path, tmp_path: Path) -> None:
    """The same bundle gives the same bytes; weights, run outputs and hidden files are left out; big files refused."""
    bundle = tmp_path / "msam_kits19"
    shutil.copytree(KITS, bundle)
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    (bundle / "eval").mkdir()
    (bundle / "eval" / "metrics.json").write_text("{}")
    (bundle / "configs" / ".notes.swp").write_text("x")
    rebuilt = build_archive(bundle, tmp_path / "dist")
    assert rebuilt.read_bytes() == kits_archive.read_bytes()
    (bundle / "docs" / "big.png").write_bytes(b"0" * (MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="docs/big.png"):
        build_archive(bundle, tmp_path / "dist2")
    assert not (tmp_path / "dist2" / rebuilt.name).exists()


def test_rewrite_keeps_everything_else() -> None:
    """Only the imports and initialize lists change, comments included; a config without initialize is refused."""
    text = "# header\nimports:\n  - $import os\n  - $import msam_components\nx: 1  # kept\ninitialize:\n  - $print(1)\n"
    rewritten = rewrite_config_for_archive(text)
    assert rewritten.startswith("# header\n") and "x: 1  # kept" in rewritten
    parsed = yaml.safe_load(rewritten)
    assert parsed["imports"] == ["$import os"]
    assert parsed["initialize"][0] == "$import sys" and parsed["initialize"][2:] == [
        "$import msam_components",
        "$print(1)",
    ]
    assert rewrite_config_for_archive("a: 1\n") == "a: 1\n"
    with pytest.raises(ValueError, match="no initialize"):
        rewrite_config_for_archive("imports:\n  - $import msam_components\n")


def test_archived_inference_runs_without_installed_package(kits_archive: Path, tmp_path: Path) -> None:
    """Unzip, then run configs/inference.yaml in `python -I -S`: the package comes from the archive's scripts/."""
    with zipfile.ZipFile(kits_archive) as archive:
        archive.extractall(tmp_path / "unzipped")
    bundle = tmp_path / "unzipped" / "msam_kits19"
    make_kits19_like(tmp_path / "data", num_cases=1, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.5), seed=0)
    image, seg = (
        tmp_path / "data" / "case_00000" / "imaging.nii.gz",
        tmp_path / "data" / "case_00000" / "segmentation.nii.gz",
    )
    voxels = np.argwhere(np.asarray(nib.load(str(seg)).dataobj) == 2)
    click = [int(v) for v in voxels[np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1))]]
    parser = ConfigParser()  # the tiny overlay's network, random weights
    parser.read_config([str(REPO / "bundles" / "msam_kits19" / "configs" / "inference.yaml"), str(SMALL)])
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "tiny.pt")
    script = DRIVER.format(
        site=sysconfig.get_paths()["purelib"],
        configs=str([str(bundle / "configs" / "inference.yaml"), str(SMALL)]),
        bundle=str(bundle),
        image=str(image),
        foreground=json.dumps([click]),
        ckpt=str(tmp_path / "tiny.pt"),
        out=str(tmp_path / "out"),
    )
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"] is None, f"msam_components was importable before the run: {report['before']}"
    assert report["used"] == str(bundle / "scripts" / "msam_components" / "__init__.py")
    written = tmp_path / "out" / "case_00000_seg.nii.gz"  # named after the case folder, not imaging.nii.gz
    assert written.is_file()
    assert nib.load(str(written)).shape == nib.load(str(image)).shape


def test_archived_metadata_is_valid_and_lists_export_formats(
    kits_archive: Path, schema_dir: Path, tmp_path: Path
) -> None:
    """The archived metadata (export formats added) still passes the zoo's schema; each format's command names it."""
    from monai.bundle import verify_metadata

    with zipfile.ZipFile(kits_archive) as archive:
        meta_file = tmp_path / "metadata.json"
        meta_file.write_bytes(archive.read("msam_kits19/configs/metadata.json"))
    schema = tmp_path / "schema.json"
    schema.write_bytes((schema_dir / "meta_schema_20240725.json").read_bytes())
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    formats = json.loads(meta_file.read_text())["exported_formats"]
    for name, entry in formats.items():
        assert f"--format {name}" in entry["command"] and all(f.startswith(f"models/{name}/") for f in entry["files"])
