"""The declared dependencies are the ones the code uses: every package of ``[project]
dependencies`` (what any install pulls in) is imported by some module of the package (read
from the source, nothing imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAME = {"pyyaml": "yaml", "pillow": "PIL"}  # distribution -> module, where they differ


def _core_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    project = text[text.index("[project]") :]
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", project, re.S | re.M)
    assert block, "pyproject.toml: no [project] dependencies"
    names = re.findall(r'"\s*([A-Za-z0-9_.\-]+)', block.group(1))
    return [IMPORT_NAME.get(n.lower(), n.lower().replace("-", "_")) for n in names]


def _imported_top_level() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "multiverse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_every_core_dependency_is_imported():
    deps = _core_dependencies()
    assert "torch" in deps
    unused = [d for d in deps if d not in _imported_top_level()]
    assert not unused, (
        f"declared in [project] dependencies but imported nowhere in multiverse/: {unused}"
    )
