"""The folders' dependencies point one way (STYLE.md "Layout shows the architecture").

``learner/`` never imports ``actors/`` (the actors import the learner and its concurrency
group, not the reverse); no product package imports ``scripts/`` (thin entry points) or
``demo/`` (the demo's offline preparation, which the pipeline only reaches through
``scripts/``). Read from the source with ``ast``, so a lazy import inside a function counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> top-level packages it must not import
FORBIDDEN: dict[str, set[str]] = {
    "learner": {"actors", "scripts", "demo"},
    "buffers": {"actors", "scripts", "demo"},
    "actors": {"scripts", "demo"},
    "configs": {"scripts", "demo"},
    "demo": {"scripts"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level names every ``import``/``from ... import`` in ``path`` reaches (relative imports skipped)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_imported_packages_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os.path\nfrom actors.x import y\n\ndef g():\n    import scripts.train\n    from . import z\n")
    assert imported_packages(f) == {"os", "actors", "scripts"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_the_packages_above_it(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = {f.relative_to(REPO).as_posix(): sorted(imported_packages(f) & FORBIDDEN[package]) for f in files}
    assert not {f: names for f, names in bad.items() if names}
