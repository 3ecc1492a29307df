"""The package layout's rules, read from the source (no imports of the modules under test):

  * no import cycles between the project's modules (lazy imports inside functions count too);
  * the library (format, engine, train, eval) never imports the apps (cli); ``engine`` and
    ``format`` never import ``eval``; ``format`` never imports ``engine`` or ``train``;
  * the core (``format``) imports only the standard library, torch and itself at module level;
  * no module is named like a standard-library module, none is over 400 lines;
  * the public API of the README imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "multiverse"
COMPAT = {"multiverse.grammar", "multiverse.attention"}  # old import paths, re-exports only
MAX_LINES = 400


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(project modules imported anywhere in ``name``, top-level packages imported at module
    level). ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    tree = ast.parse(MODULES[name].read_text())
    ours: set[str] = set()
    top_level: set[str] = set()
    is_pkg = MODULES[name].name == "__init__.py"

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only
            if isinstance(child, ast.Import):
                for a in child.names:
                    if module_level:
                        top_level.add(a.name.split(".")[0])
                    if a.name.startswith("multiverse"):
                        ours.add(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative import
                    base = name if is_pkg else name.rsplit(".", 1)[0]
                    for _ in range(child.level - 1):
                        base = base.rsplit(".", 1)[0]
                    mod = f"{base}.{child.module}" if child.module else base
                else:
                    mod = child.module or ""
                if module_level:
                    top_level.add(mod.split(".")[0])
                if mod.startswith("multiverse"):
                    for a in child.names:
                        sub = f"{mod}.{a.name}"
                        ours.add(sub if sub in MODULES else mod)
            visit(child, inner)

    visit(tree, True)
    ours.discard(name)
    return ours, top_level


GRAPH = {name: _imports(name)[0] for name in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(nxt):
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in MODULES:
        if not state.get(name):
            dfs(name)


FORBIDDEN = {
    "format": {"engine", "train", "eval", "curate", "server", "cli", "remote"},
    "engine": {"train", "eval", "curate", "server", "cli", "remote"},
    # the fork/join driver over HTTP servers: a library layer beside the engine (its rules)
    "remote": {"train", "eval", "curate", "server", "cli"},
    "train": {"curate", "server", "cli"},
    "eval": {"curate", "server", "cli"},
    "curate": {"engine", "train", "server", "cli"},
    "server": {"curate", "cli"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = [
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if _layer(name) == layer
        for dep in deps
        if _layer(dep) in FORBIDDEN[layer]
    ]
    assert not bad, "\n".join(bad)


def test_library_never_imports_the_root_package_or_apps():
    # `from multiverse import LLM` in a library module would route through the root package
    bad = [f"{n} imports multiverse (root)" for n, deps in GRAPH.items()
           if _layer(n) in ("format", "engine", "remote") and "multiverse" in deps]  # fmt: skip
    assert not bad, bad


def test_core_imports_only_stdlib_and_torch():
    allowed = set(sys.stdlib_module_names) | {"torch", "multiverse", "__future__"}
    bad = {
        name: sorted(top - allowed)
        for name in MODULES
        if _layer(name) == "format"
        for top in [_imports(name)[1]]
        if top - allowed
    }
    assert not bad, bad


def test_module_names_and_sizes():
    for name, path in MODULES.items():
        leaf = name.rsplit(".", 1)[-1]
        assert leaf not in sys.stdlib_module_names, f"{name} is named like the stdlib module {leaf!r}"
        if name not in COMPAT:
            n = len(path.read_text().splitlines())
            assert n <= MAX_LINES, f"{path.relative_to(PKG.parent)} has {n} lines (> {MAX_LINES})"


def test_core_imports_without_hugging_face():
    """``multiverse.format`` (and the public names) import where transformers is missing."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'tokenizers', 'safetensors', 'fastapi', 'matplotlib'):\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import multiverse\n"
        "from multiverse import grammar, layout, attention\n"
        "import multiverse.format.document, multiverse.format.parser, multiverse.format.prompts\n"
        "import multiverse.format.tokenizer, multiverse.locations\n"
        "assert multiverse.grammar is grammar and attention is layout\n"
        "import multiverse.grammar as g2; assert g2 is grammar\n"
        "st = layout.LayoutState()\n"
        "for tag in ('<Think>', None, '<Parallel>', '<Goal>', None, '</Goal>', None):\n"
        "    st.step(tag)\n"
        "print(grammar.validate('<Think>\\nx\\n</Think>'), st.fork(2)[1].next_pos)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "7"]


BOOKKEEPING = ("kv_manager", "radix", "records", "request", "invariants", "scheduler", "forkjoin", "reuse")


def test_engine_bookkeeping_imports_no_torch():
    """Branch trees, KV slot ownership, the prefix cache and scheduling are plain Python."""
    for leaf in BOOKKEEPING:
        top = _imports(f"multiverse.engine.{leaf}")[1]
        assert "torch" not in top, f"multiverse.engine.{leaf} imports torch"
