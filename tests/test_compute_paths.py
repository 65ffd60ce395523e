"""The fast and reference computations live behind one seam (``compute_paths.py``), chosen once per model."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from msam_components.networks import build_msam
from msam_components.networks.compute_paths import FAST, REFERENCE, ComputePath, UsesComputePath, set_attention_impl
from msam_components.networks.mea import MaskEnhancedAdapter

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

NETWORKS = Path(__file__).resolve().parents[1] / "msam_components" / "networks"
MODULES = sorted(p.stem for p in NETWORKS.glob("*.py") if p.stem != "__init__")
TINY = dict(image_size=32, patch_size=8, encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2)
TINY.update(encoder_global_attn_indexes=(1,), encoder_window_size=3, prompt_embed_dim=24, mask_in_chans=4)
TINY.update(decoder_num_heads=2, decoder_mlp_dim=16, iou_head_hidden_dim=8, mea_num_heads=2, lora_rank=2)


PACKAGE = NETWORKS.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports(path: Path) -> set[str]:
    """Every module of the package ``path`` imports, anywhere in it: at load time, in a function or under
    ``if TYPE_CHECKING:`` (a type-only import still ties the two modules together)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
    return found


def test_the_package_imports_without_cycles() -> None:
    """No module of msam_components imports, directly or through others, one that imports it back (the
    ``__init__`` files, which only gather names, aside)."""
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _package_imports(p) & modules for p in files}
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join(trail + (name,))}"
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, trail + (name,))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())
    assert {"msam_components.networks.compute_paths", "msam_components.networks.mask_input"} <= done


def test_the_mask_prompt_is_not_type_checked() -> None:
    """The fast path's factored mask is the seam's business: no networks module asks which form it got."""
    offenders = [
        p.name
        for p in NETWORKS.glob("*.py")
        if re.search(r"isinstance\([^)]*(FactoredDense|MaskInput)", p.read_text()) or "factored=" in p.read_text()
    ]
    assert offenders == []


def test_only_the_seam_branches_on_the_path() -> None:
    """No module outside ``compute_paths.py`` compares against a path name, and none imports late."""
    offenders = []
    for path in NETWORKS.glob("*.py"):
        text = path.read_text()
        if path.name != "compute_paths.py" and re.search(r"[!=]=\s*[\"'](fast|reference)[\"']", text):
            offenders.append(f"{path.name}: compares a path name")
        if re.search(r"^[ \t]+from \.\w+ import", text, flags=re.M) or "TYPE_CHECKING" in text:
            offenders.append(f"{path.name}: local or type-only import")
    assert offenders == []


def test_paths_hold_the_same_operations() -> None:
    assert isinstance(FAST, ComputePath) and FAST.name == "fast" and REFERENCE.name == "reference"
    operations = ("attention", "windowed_attention", "decoder_masks", "upsample", "mea_mask_input", "mea_mask_kernel")
    assert all(getattr(FAST, f) is not getattr(REFERENCE, f) for f in operations)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_a_model_is_built_on_one_path_and_switches_as_a_whole(impl: str) -> None:
    """The builder puts every part on the path asked for (the MEA included), and one call switches them all; a part
    built alone is on the fast path until switched."""
    mea = MaskEnhancedAdapter(16, 2, 2.0, (4, 4, 4))
    assert {m.path.name for m in mea.modules() if isinstance(m, UsesComputePath)} == {"fast"}
    model = build_msam(**TINY, attention_impl=impl)
    users = [m for m in model.modules() if isinstance(m, UsesComputePath)]
    assert len(users) >= 6 and {m.attention_impl for m in users} == {impl}
    other = "reference" if impl == "fast" else "fast"
    set_attention_impl(model, other)
    assert {m.attention_impl for m in users} == {other}
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        set_attention_impl(model, "flash")


def test_decode_takes_a_bare_embedding_or_its_state() -> None:
    """A bare embedding is prepared the same way as :meth:`MSAM.prepare_embedding`: one path through ``decode``."""
    torch.manual_seed(0)
    model = build_msam(**TINY).eval()
    image = torch.randn(1, 1, 32, 32, 32)
    points, labels = torch.tensor([[[10, 12, 14]]]), torch.tensor([[1]])
    low = torch.randn(1, 1, *model.low_res_size)
    with torch.no_grad():
        embedding = model.encode(image)
        state = model.prepare_embedding(embedding)
        assert set(state.tensors()) == {"embedding", "mea_image", "mea_image_conv", "mask_kernel"}
        torch.testing.assert_close(
            model.decode(embedding, points, labels, low), model.decode(state, points, labels, low)
        )
