"""The layers point one way: supervisor -> pool -> drivers, with config and the
guest's wire code below all of them (ARCHITECTURE.md, STYLE.md 14).

Read from the source, as the import statements are written (absolute, relative,
at module level or inside a function): what a module may not import, no module
of that folder imports.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: folder -> the packages nothing under it may import, and why.
RULES: dict[str, tuple[tuple[str, ...], str]] = {
    "pool": (("fireclaw.supervisor",), "the pool declares what it needs from above"),
    "config": (
        ("fireclaw.supervisor", "fireclaw.pool"),
        "the config is below every layer that reads it",
    ),
    "guest_daemon": (
        ("fireclaw.supervisor", "fireclaw.pool", "fireclaw.config"),
        "it ships into VM images alone",
    ),
}


def imports(path: pathlib.Path, package: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in the file at ``path``, whose package
    is ``package``; relative imports resolved against it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                up = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*up, node.module] if node.module else up)
            yield node.lineno, base
            # ``from fireclaw import supervisor`` names the package in the alias.
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def package_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(["fireclaw", *rel.parts[:-1]])


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imports(path, package_of(path)):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    return sorted(set(found))


@pytest.mark.parametrize("folder", sorted(RULES))
def test_no_module_imports_a_layer_above_its_own(folder: str) -> None:
    forbidden, why = RULES[folder]
    assert (ROOT / folder).is_dir()
    assert violations(folder, forbidden) == [], f"{folder}/ must not import {forbidden}: {why}"


def test_the_check_sees_absolute_relative_and_nested_imports(tmp_path: pathlib.Path) -> None:
    """The reader above finds every way of writing an upward import."""
    source = tmp_path / "pool" / "drivers" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import fireclaw.supervisor.state\n"
        "from ...supervisor import daemon\n"
        "from fireclaw import supervisor\n"
        "def f():\n"
        "    from fireclaw.supervisor.procid import boot_id\n"
        "from fireclaw.pool.store import VmRecord\n"
    )
    found: dict[int, set[str]] = {}
    for line, module in imports(source, "fireclaw.pool.drivers"):
        found.setdefault(line, set()).add(module)
    assert "fireclaw.supervisor.state" in found[1]
    assert "fireclaw.supervisor.daemon" in found[2]
    assert "fireclaw.supervisor" in found[3]
    assert "fireclaw.supervisor.procid" in found[5]
    assert not any(m.startswith("fireclaw.supervisor") for m in found[6])
