"""The house: packages by layer, each importing only its own layer and those below (docs/architecture.md).

A module's imports are read from its source (lazy ones inside functions included), so an upward import fails here
even when no test happens to run it."""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "headscope"

# bottom to top: a module may import its own layer and every layer below it, never one above
LAYERS = [
    ("foundation", ["headscope.errors", "headscope.validate", "headscope.answers", "headscope.metrics",
                    "headscope.parser", "headscope.bundled"]),
    ("scorers", ["headscope.scorers"]),
    ("tasks", ["headscope.options", "headscope.tasks"]),
    ("attention", ["headscope.attention"]),
    ("runs", ["headscope.runs"]),
    ("heads", ["headscope.heads"]),
    ("detection", ["headscope.detection"]),
    ("experiments", ["headscope.experiments", "headscope.organism"]),
    ("cli", ["headscope.cli"]),
    ("families", ["headscope.families"]),
]
FACADE = {"headscope", "headscope.__main__"}  # the package's API and `python -m headscope`: above every layer


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every headscope module `path` imports, relative imports resolved."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(part for part in (base, node.module or "") if part)
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules  # `from . import x`
            found |= submodules if len(submodules) == len(node.names) else submodules | {target}
    return found & modules


def upward_imports(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if name in FACADE:
            continue
        for target in sorted(imported_modules(path, root) - FACADE):
            if layer_of(target) > layer_of(name):
                problems.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]})")
    return problems


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_a_planted_upward_import_is_caught(tmp_path):
    copy = tmp_path / "headscope"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.safetensors", "data", "__pycache__"))
    analysis = copy / "heads" / "analysis.py"
    analysis.write_text(analysis.read_text() + "\n\ndef planted():\n    from ..experiments import ablation\n")
    assert upward_imports(copy) == ["headscope.heads.analysis (heads) imports headscope.experiments.ablation "
                                    "(experiments)"]


def test_the_architecture_guide_names_every_module_and_only_those():
    guide = (ROOT / "docs" / "architecture.md").read_text()
    files = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    elsewhere = ("headscope/", "tests/", "benchmarks/", "scripts/")  # files outside the package, named in passing
    named = {path for path in re.findall(r"`([\w/]+\.py)`", guide) if not path.startswith(elsewhere)}
    assert files - named == set(), "modules the guide does not name"
    assert named - files == set(), "modules the guide names that do not exist"
    for layer, prefixes in LAYERS:  # the layers in the guide's order
        assert f"**{layer}**" in guide, layer
    order = [guide.index(f"**{layer}**") for layer, _ in LAYERS]
    assert order == sorted(order), "the guide lists the layers in another order than the test"
