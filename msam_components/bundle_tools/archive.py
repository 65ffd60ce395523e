"""Pack a bundle into a self-contained model-zoo archive ``<name>_v<version>.zip`` that runs without msam_components.

The archive holds ``<name>/`` with the bundle's configs, docs, LICENSE and models/.gitkeep, plus this package's
source under ``<name>/scripts/msam_components/``. Weights, data, caches and outputs are left out; any file over 1 MB
stops the build.

How the archived configs find the package: MONAI evaluates every ``$import`` statement of a config before any other
expression (at the first item it resolves), so an ``imports`` entry cannot put ``scripts/`` on ``sys.path`` in time
for ``$import msam_components``, and a non-import expression under ``imports`` is never evaluated at all. The
archived configs therefore drop ``$import msam_components`` from ``imports`` and start their ``initialize`` list with
``$import sys``, ``sys.path.insert(0, <bundle_root>/scripts)`` and ``$import msam_components``.
ConfigWorkflow drops each ``initialize`` result after evaluating it, so that import statement is evaluated again,
now successfully, before the next item and before ``run``; ``_target_`` components import lazily at instantiation.
tests/test_bundle_archive.py runs an archived config in an interpreter that cannot import the installed package.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from ..io import atomic_write

__all__ = [
    "EXPORTED_FORMATS",
    "MAX_FILE_BYTES",
    "archive_configs",
    "build_archive",
    "main",
    "rewrite_config_for_archive",
]

MAX_FILE_BYTES = 1024 * 1024
PACKAGE_DIR = Path(__file__).resolve().parents[1]
BUNDLE_TOP_LEVEL = ("configs", "docs", "scripts", "LICENSE", "models")  # what a bundle ships; eval/, runs/ are outputs
EXCLUDED_SUFFIXES = (
    *(".pt", ".pth", ".ckpt", ".ts", ".onnx", ".safetensors", ".engine", ".plan", ".bin"),  # weights
    *(".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm", ".npy", ".npz", ".h5", ".hdf5"),  # images and arrays
    *(".pyc", ".pyo"),
)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same archive bytes
_IMPORT_PACKAGE = "$import msam_components"
# Prepended to every archived `initialize` list (os comes from the bundle's `imports`, as the configs already assume).
_INITIALIZE_ENTRIES = (
    "$import sys",
    "\"$sys.path.insert(0, os.path.join(os.path.abspath(@bundle_root), 'scripts'))\"",
    _IMPORT_PACKAGE,
)
# The formats `python -m msam_components.export` writes from a bundle's weights, listed in the archived metadata the way
# the MONAI Bundle specification names a bundle's exported files (models/model.ts, models/model.onnx). The weights are
# not shipped, so each entry says which files the export makes and the command that makes them.
_EXPORT_COMMAND = (
    "PYTHONPATH=scripts python -m msam_components.export --config_file configs/inference.yaml --ckpt_path models/model.pt "
    "--output_dir models/{fmt} --format {fmt} --check"
)
EXPORTED_FORMATS = {
    "torchscript": {
        "files": ["models/torchscript/encoder.ts", "models/torchscript/decode_step.ts"],
        "runtime": "torch.jit.load",
        "command": _EXPORT_COMMAND.format(fmt="torchscript"),
    },
    "onnx": {
        "files": ["models/onnx/encoder.onnx", "models/onnx/decode_step.onnx"],
        "runtime": "onnxruntime",
        "opset": 18,
        "command": _EXPORT_COMMAND.format(fmt="onnx"),
    },
}


def _is_shipped(relative: Path) -> bool:
    """Whether a bundle or package file belongs in the archive (no weights, data, caches, hidden files or outputs)."""
    name = relative.name
    if "__pycache__" in relative.parts or any(part.startswith(".") for part in relative.parts[:-1]):
        return False
    if name.startswith(".") and name != ".gitkeep":
        return False
    return not name.endswith(EXCLUDED_SUFFIXES)


def _top_level_block(lines: list[str], key: str) -> tuple[int, int] | None:
    """Return the [start, end) line range of a top-level YAML key and its indented body, or None."""
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{re.escape(key)}:\s*(#.*)?$", line)), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " #" or lines[end].startswith("- ")):
        end += 1
    return start, end


def _is_package_import(line: str) -> bool:
    """Whether a YAML line is the list item ``- $import msam_components``."""
    return line.strip() == f"- {_IMPORT_PACKAGE}"


def _item_indent(lines: list[str], start: int, end: int, key: str, source: str) -> str:
    """Return the indentation of a block list's items ("  " for "  - x"); refuse anything but a block list."""
    for line in lines[start + 1 : end]:
        match = re.match(r"^(\s*)- ", line)
        if match:
            return match.group(1)
    raise ValueError(f"{source}: top-level {key!r} is not a block list; cannot add the archive's import path")


def rewrite_config_for_archive(text: str, source: str = "<config>") -> str:
    """Rewrite one YAML config so it imports msam_components from <bundle_root>/scripts (see the module docstring).

    The edit is made on the text, so comments and layout stay; the parsed result is checked against the intended one.
    """
    original = yaml.safe_load(text) or {}
    imports = list(original.get("imports") or [])
    if _IMPORT_PACKAGE in imports and "initialize" not in original:
        raise ValueError(f"{source}: imports msam_components but has no initialize list to import it from scripts/")
    lines = text.split("\n")
    block = _top_level_block(lines, "imports")
    if block is not None:
        lines = [line for i, line in enumerate(lines) if not (block[0] < i < block[1] and _is_package_import(line))]
    block = _top_level_block(lines, "initialize")
    if block is not None:
        indent = _item_indent(lines, *block, "initialize", source)
        lines[block[0] + 1 : block[0] + 1] = [f"{indent}- {entry}" for entry in _INITIALIZE_ENTRIES]
    rewritten = "\n".join(lines)
    expected = dict(original)
    if "imports" in original:
        expected["imports"] = [item for item in imports if item != _IMPORT_PACKAGE]
    if "initialize" in original:
        expected["initialize"] = [*(yaml.safe_load(e) for e in _INITIALIZE_ENTRIES), *original["initialize"]]
    if yaml.safe_load(rewritten) != expected:
        raise ValueError(f"{source}: rewriting the imports for the archive changed more than intended")
    return rewritten


def archive_configs(bundle_dir: Path) -> dict[str, bytes]:
    """The bundle's configs as archived: YAML imports rewritten; metadata without the package pin, with the export formats."""
    out = {}
    for path in sorted((bundle_dir / "configs").iterdir()):
        relative = f"configs/{path.name}"
        if path.suffix in (".yaml", ".yml"):
            out[relative] = rewrite_config_for_archive(path.read_text(encoding="utf-8"), relative).encode()
        elif path.name == "metadata.json":
            meta = json.loads(path.read_text(encoding="utf-8"))
            meta.get("required_packages_version", {}).pop("msam-components", None)  # shipped under scripts/
            meta["exported_formats"] = EXPORTED_FORMATS
            out[relative] = (json.dumps(meta, indent=4, ensure_ascii=False) + "\n").encode()
    return out


def _collect(bundle_dir: Path, package_dir: Path) -> dict[str, bytes]:
    """Gather every archived file as {path inside the bundle: bytes}; refuse files over the size limit."""
    files: dict[str, bytes] = {}
    for path in sorted(bundle_dir.rglob("*")):
        relative = path.relative_to(bundle_dir)
        if path.is_file() and relative.parts[0] in BUNDLE_TOP_LEVEL and _is_shipped(relative):
            files[relative.as_posix()] = path.read_bytes()
    files.update(archive_configs(bundle_dir))
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir.parent)
        if _is_shipped(relative):
            target = f"scripts/{relative.as_posix()}"
            if target in files:
                raise ValueError(f"the bundle already has {target}; cannot ship msam_components there")
            files[target] = path.read_bytes()
    too_big = [f"{name} ({len(data)} bytes)" for name, data in files.items() if len(data) > MAX_FILE_BYTES]
    if too_big:
        raise ValueError(f"files over {MAX_FILE_BYTES} bytes cannot go into a bundle archive: {', '.join(too_big)}")
    return files


def build_archive(
    bundle_dir: str | os.PathLike, output_dir: str | os.PathLike, package_dir: Path | None = None
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` for a bundle folder and return its path (written atomically)."""
    bundle = Path(bundle_dir).resolve()
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{str(bundle)!r} is not a bundle: {meta_file} is missing")
    version = json.loads(meta_file.read_text(encoding="utf-8")).get("version")
    if not version:
        raise ValueError(f"{meta_file} has no 'version'")
    files = _collect(bundle, PACKAGE_DIR if package_dir is None else Path(package_dir))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(f"{bundle.name}/{name}", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"{bundle.name}_v{version}.zip"
    atomic_write(target, lambda f: f.write(buffer.getvalue()), binary=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m msam_components.bundle_tools.archive bundles/msam_kits19 --output dist/``."""
    parser = argparse.ArgumentParser(
        prog="python -m msam_components.bundle_tools.archive",
        description="Pack a bundle and the msam_components source into a self-contained <name>_v<version>.zip.",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder (holds configs/metadata.json)")
    parser.add_argument("--output", type=Path, default=Path("dist"), help="folder for the zip (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        target = build_archive(args.bundle, args.output)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with zipfile.ZipFile(target) as archive:
        count = len(archive.namelist())
    print(f"wrote {target} ({count} files, {target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
