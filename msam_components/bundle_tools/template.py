"""Render `bundle_template/` for a `BundleSpec` and write the bundle folder all at once (or not at all).

Placeholders are ``{{name}}``. In text files a placeholder alone on its line is a block: every line of the value is
indented like the placeholder, and an empty value removes the line. Elsewhere a placeholder is replaced inline by a
one-line value. JSON files are parsed, placeholders are replaced inside keys and strings (a list value replaces a
string that is only that placeholder, spliced into its list), and the result is dumped with an indent of 4.
Rendering fails on an unknown placeholder, and on a value that no template file uses, so template and spec stay in step.

Every rendered config and the README start with a line naming their template (``rendered_header``), so a reader who
opens a bundle file knows to edit the template instead. JSON has no comments and a licence is recognised by its exact
text, so ``metadata.json`` and ``LICENSE`` carry none. Re-rendering an existing bundle (``force``) keeps the body of its
README's ``## Performance`` section: those are the bundle's own measured numbers, not template text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .spec import BundleSpec, placeholder_values

__all__ = [
    "RERENDER_COMMAND",
    "TEMPLATE_DIR",
    "TEMPLATE_NOTES",
    "render_bundle",
    "render_files",
    "render_json",
    "render_text",
    "rendered_header",
]

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "bundle_template"
TEMPLATE_NOTES = "TEMPLATE.md"  # documents the template itself; not part of a rendered bundle
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z][a-z0-9_]*)\s*\}\}")
RERENDER_COMMAND = "python -m msam_components.bundle_tools.new_bundle --preset <preset> --output bundles/ --force"
_PERFORMANCE = re.compile(r"(?s)(\n## Performance\n)(.*?)(?=\n## |\Z)")
Values = dict[str, Any]


def _lookup(name: str, values: Values, source: str, used: set[str]) -> Any:
    """Return a placeholder's value, recording its use; an unknown name is an error naming the file."""
    if name not in values:
        raise KeyError(f"{source}: unknown placeholder {{{{{name}}}}}; known: {', '.join(sorted(values))}")
    used.add(name)
    return values[name]


def _inline(text: str, values: Values, source: str, used: set[str]) -> str:
    """Replace every placeholder inside a line or string by its one-line string value."""

    def replace(match: re.Match) -> str:
        value = _lookup(match.group(1), values, source, used)
        if not isinstance(value, str) or "\n" in value:
            raise ValueError(f"{source}: {{{{{match.group(1)}}}}} is used inline but its value is not one line of text")
        return value

    return _PLACEHOLDER.sub(replace, text)


def render_text(text: str, values: Values, source: str = "<text>", used: set[str] | None = None) -> str:
    """Render a text template: block placeholders on their own line, inline placeholders elsewhere."""
    used = set() if used is None else used
    lines = []
    for line in text.split("\n"):
        match = _PLACEHOLDER.fullmatch(line.strip())
        if match is None:
            lines.append(_inline(line, values, source, used))
            continue
        value = _lookup(match.group(1), values, source, used)
        if not isinstance(value, str):
            raise ValueError(f"{source}: {{{{{match.group(1)}}}}} needs a text value, got {type(value).__name__}")
        if value:  # an empty block value drops the placeholder's line
            indent = line[: len(line) - len(line.lstrip())]
            lines.extend(indent + part if part else part for part in value.split("\n"))
    return "\n".join(lines)


def _render_json_value(node: Any, values: Values, source: str, used: set[str]) -> Any:
    """Substitute placeholders in a parsed JSON value; a list value replaces a whole-placeholder string."""
    if isinstance(node, dict):
        return {_inline(k, values, source, used): _render_json_value(v, values, source, used) for k, v in node.items()}
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            rendered = _render_json_value(item, values, source, used)
            out.extend(rendered if isinstance(rendered, list) and isinstance(item, str) else [rendered])
        return out
    if isinstance(node, str):
        match = _PLACEHOLDER.fullmatch(node)
        if match and isinstance(values.get(match.group(1)), list):
            return list(_lookup(match.group(1), values, source, used))
        return _inline(node, values, source, used)
    return node


def render_json(text: str, values: Values, source: str = "<json>", used: set[str] | None = None) -> str:
    """Render a JSON template and dump it with an indent of 4 and a final newline (the model-zoo style)."""
    used = set() if used is None else used
    rendered = _render_json_value(json.loads(text), values, source, used)
    return json.dumps(rendered, indent=4, ensure_ascii=False) + "\n"


def _template_files(template: Path) -> list[Path]:
    """List the template's files (relative paths, sorted), without the template's own notes and caches."""
    if not template.is_dir():
        raise FileNotFoundError(f"bundle template folder {str(template)!r} not found (it sits at the repository root)")
    files = []
    for path in sorted(template.rglob("*")):
        relative = path.relative_to(template)
        if path.is_file() and relative.as_posix() != TEMPLATE_NOTES and "__pycache__" not in relative.parts:
            files.append(relative)
    return files


def rendered_header(relative: str) -> str:
    """The first line of a rendered file: where it comes from and how to change it ('' for files that take none)."""
    text = f"rendered from bundle_template/{relative}; edit the template and re-render ({RERENDER_COMMAND})"
    suffix = Path(relative).suffix
    if suffix in (".yaml", ".yml", ".conf"):
        return f"# {text}\n"
    if suffix == ".md":
        return f"<!-- {text} -->\n"
    return ""


def keep_performance(rendered: str, existing: str) -> str:
    """The rendered README with the body of its ``## Performance`` section taken from the existing README."""
    old = _PERFORMANCE.search(existing)
    if old is None or _PERFORMANCE.search(rendered) is None:
        return rendered
    return _PERFORMANCE.sub(lambda m: m.group(1) + old.group(2), rendered, count=1)


def render_files(spec: BundleSpec, template: Path | None = None) -> dict[str, str]:
    """Render every template file for a spec; returns {relative posix path: content}."""
    template = TEMPLATE_DIR if template is None else Path(template)
    values = placeholder_values(spec)
    used: set[str] = set()
    rendered = {}
    for relative in _template_files(template):
        text = (template / relative).read_text(encoding="utf-8")
        render = render_json if relative.suffix == ".json" else render_text
        content = render(text, values, source=relative.as_posix(), used=used)
        rendered[relative.as_posix()] = rendered_header(relative.as_posix()) + content
    unused = sorted(set(values) - used)
    if unused:
        raise ValueError(f"the template in {str(template)!r} uses none of these answers: {', '.join(unused)}")
    return rendered


def _write_all(files: dict[str, str], folder: Path) -> None:
    """Write rendered files under a folder (LF line endings, UTF-8)."""
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(content)


def _current_umask() -> int:
    """Return the process umask (reading it requires setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def render_bundle(
    spec: BundleSpec, output_dir: str | os.PathLike, force: bool = False, template: Path | None = None
) -> Path:
    """Write the bundle `<output_dir>/<spec.name>`; refuse an existing one unless force, and write nothing on failure.

    Everything is rendered and written into a hidden staging folder next to the target first. A new bundle is then
    renamed into place in one step; with ``force`` the template's files replace their namesakes in the existing folder
    one by one (each an atomic rename) and every other file there (weights, a demo overlay) is kept, as is the body of
    the existing README's ``## Performance`` section.
    """
    output = Path(output_dir)
    target = output / spec.name
    if target.exists() and not force:
        raise FileExistsError(
            f"bundle folder {str(target)!r} already exists; pass --force to overwrite its template files"
        )
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a folder")
    files = render_files(spec, template)
    readme = target / "docs" / "README.md"
    if "docs/README.md" in files and readme.is_file():
        files["docs/README.md"] = keep_performance(files["docs/README.md"], readme.read_text(encoding="utf-8"))
    created_output = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.staging-", dir=output))
    try:
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp's 0o700 would otherwise become the bundle's mode
        _write_all(files, staging)
        if not target.exists():
            os.replace(staging, target)
            return target
        for relative in files:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target / relative)
        return target
    except BaseException:
        if created_output and not target.exists():
            shutil.rmtree(output, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
