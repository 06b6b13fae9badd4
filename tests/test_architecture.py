"""The package boundaries of docs/architecture.md, checked on every import in cpt/ (lazy ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "cpt"

# module prefix -> prefixes it must never import (docs/architecture.md, "Boundaries")
FORBIDDEN = {
    "cpt.common": ("cpt.data", "cpt.training", "cpt.export", "cpt.tools", "cpt.cli", "cpt.pipeline", "cpt.config"),
    "cpt.config": ("cpt.data", "cpt.training", "cpt.export", "cpt.tools", "cpt.cli", "cpt.pipeline"),
    "cpt.data": ("cpt.training", "cpt.export", "cpt.tools", "cpt.cli", "cpt.pipeline"),
    "cpt.training": ("cpt.export", "cpt.tools", "cpt.cli", "cpt.pipeline"),
    "cpt.export": ("cpt.tools", "cpt.cli", "cpt.pipeline"),
    "cpt.tools": ("cpt.training.loop", "cpt.cli"),
    "cpt.pipeline": ("cpt.cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in the file, at any depth; `from a import b` gives a.b too
    (b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        importer = module_name(path)
        rules = [banned for owner, banned in FORBIDDEN.items() if is_under(importer, owner)]
        for line, imported in imported_modules(path):
            for banned in (prefix for rule in rules for prefix in rule):
                if is_under(imported, banned):
                    found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {importer} imports {imported}")
    return sorted(set(found))


def test_no_module_crosses_a_boundary():
    assert violations() == []


def test_the_checker_sees_lazy_and_from_imports(tmp_path, monkeypatch):
    package = tmp_path / "cpt"
    (package / "data").mkdir(parents=True)
    (package / "data" / "prepare.py").write_text(
        "def stage():\n    from cpt.training import loop\n    import cpt.export.export\n", encoding="utf-8")
    (package / "tools").mkdir()
    (package / "tools" / "plan.py").write_text("from cpt.training import session, loop\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "PACKAGE_DIR", package)
    assert violations() == [
        "cpt/data/prepare.py:2: cpt.data.prepare imports cpt.training",
        "cpt/data/prepare.py:2: cpt.data.prepare imports cpt.training.loop",
        "cpt/data/prepare.py:3: cpt.data.prepare imports cpt.export.export",
        "cpt/tools/plan.py:1: cpt.tools.plan imports cpt.training.loop",
    ]


@pytest.mark.parametrize("package", ["common", "data", "training", "export", "tools"])
def test_every_package_says_what_it_holds(package):
    docstring = ast.get_docstring(ast.parse((PACKAGE_DIR / package / "__init__.py").read_text(encoding="utf-8")))
    assert docstring and "docs/architecture.md" in docstring
