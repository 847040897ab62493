"""README.md's layout tree names every module of the packages it maps.

The tree (``## Layout``) is the map a newcomer reads first: each module of
config/, supervisor/, pool/ (with drivers/ and image/) and guest_daemon/
appears under its own folder, by name or by a glob such as ``vm_*.py``. Read
from the files on disk, so a module added without its line fails here, named.
"""

from __future__ import annotations

import fnmatch
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: The packages the tree maps, module by module.
MAPPED = ("config", "supervisor", "pool", "guest_daemon")
#: Package markers, named only where they hold something worth a line.
MARKERS = ("__init__.py", "__main__.py")


def tree_words(readme: str) -> dict[str, set[str]]:
    """folder (``pool/drivers/``) -> the ``*.py`` words (names or globs) the tree
    gives under it. A line starting with ``name/`` opens that folder; lines
    indented deeper than it belong to it."""
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    words: dict[str, set[str]] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        tokens = line.split()
        if tokens[0].endswith("/"):
            stack.append((indent, (stack[-1][1] if stack else "") + tokens[0]))
            tokens = tokens[1:]
        folder = stack[-1][1] if stack else ""
        for token in tokens:
            word = re.sub(r"[:,;()]+$", "", token.strip("`"))
            if word.endswith(".py"):
                words.setdefault(folder, set()).add(word)
    return words


def unlisted(root: pathlib.Path, words: dict[str, set[str]]) -> list[str]:
    """The modules under ``root``'s mapped packages no word of their folder matches."""
    missing = []
    for top in MAPPED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            folder = "".join(f"{part}/" for part in rel.parts[:-1])
            listed = words.get(folder, set())
            if path.name in MARKERS and path.name not in listed:
                continue
            if not any(fnmatch.fnmatch(path.name, word) for word in listed):
                missing.append(str(rel))
    return missing


def test_every_module_is_in_the_layout_tree() -> None:
    words = tree_words((ROOT / "README.md").read_text(encoding="utf-8"))
    assert set(words) >= {f"{top}/" for top in MAPPED}
    assert unlisted(ROOT, words) == [], "add these to README.md's layout tree"


def test_the_check_finds_a_module_missing_from_its_own_folder(tmp_path: pathlib.Path) -> None:
    """A name listed under another folder, or only as a folder's sibling, does not count."""
    for rel in ("config/cluster.py", "supervisor/cluster.py", "pool/vm_work.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "guest_daemon").mkdir()
    readme = (
        "## Layout\n\n```\n"
        "config/                 the config\n"
        "  cluster.py            its cluster: section\n"
        "supervisor/             the service\n"
        "  daemon.py             the tree\n"
        "pool/                   the VMs\n"
        "  vm_*.py               the child's layers\n"
        "guest_daemon/           the guest\n"
        "```\n"
    )
    words = tree_words(readme)
    assert unlisted(tmp_path, words) == ["supervisor/cluster.py"]
