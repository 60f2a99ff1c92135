"""Import hygiene, read from the source (nothing is imported to check it).

Three rules from STYLE.md ("Registries point one way"):

* no import cycles among the library's modules, lazy (function-level) imports included,
  because a lazy import only hides a cycle from the interpreter, not from the reader;
* the compiler never imports tooling (``bcc.tools``);
* tooling (``bcc/tools`` and ``examples/``) uses public names only, so the compiler's
  internals can change without breaking it.

The graph is built by walking the AST of every file. ``import bcc.a.b`` and
``from bcc.a import b`` (``b`` a submodule) are edges to ``bcc.a.b`` only: the implicit
import of the parent packages' ``__init__`` is not counted, since every module would
otherwise "depend" on ``bcc/__init__.py`` and that on everything.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
# The folder that holds each importable package: passes/ installs as bcc.passes.
PACKAGE_DIRS = {"bcc": ROOT / "bcc", "bcc.passes": ROOT / "passes"}
TOOLS = "bcc.tools"


@dataclass(frozen=True)
class Import:
    """One imported name: ``from module import name`` (``name`` None for ``import module``)."""

    importer: str  # module (or example file) holding the import statement
    module: str  # absolute module named by the statement
    name: str | None
    target: str  # the library module the statement makes ``importer`` depend on
    line: int


def _module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py" if module in MODULES else False


def _known_prefix(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a library module (``None``: not ours)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def _from_module(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from X import ...``, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = importer if _is_package(importer) else importer.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(importer: str, path: Path) -> list[Import]:
    found = []
    # ast.walk reaches imports inside functions and classes too: lazy imports count.
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known_prefix(alias.name)
                if target is not None:
                    found.append(Import(importer, alias.name, None, target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(importer, node)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                target = sub if sub in MODULES else _known_prefix(module)
                if target is not None:
                    found.append(Import(importer, module, alias.name, target, node.lineno))
    return found


def library_imports() -> list[Import]:
    return [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def import_graph() -> nx.DiGraph:
    """Modules and their imports; each edge keeps the ``lines`` of the statements behind it."""
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for imp in library_imports():
        if imp.target != imp.importer:
            if not graph.has_edge(imp.importer, imp.target):
                graph.add_edge(imp.importer, imp.target, lines=[])
            graph.edges[imp.importer, imp.target]["lines"].append(imp.line)
    return graph


def import_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """Every elementary cycle, each rotated to start at its smallest name, sorted."""
    cycles = []
    for cycle in nx.simple_cycles(graph):
        start = cycle.index(min(cycle))
        cycles.append(cycle[start:] + cycle[:start])
    return sorted(cycles, key=lambda c: (len(c), c))


def _all_names(module: str) -> set[str]:
    """The names a module lists in ``__all__`` (a literal list or tuple of strings)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return set(ast.literal_eval(node.value))
    return set()


def _is_tooling(module: str) -> bool:
    return module == TOOLS or module.startswith(TOOLS + ".")


def _private_part(dotted: str) -> str | None:
    return next((p for p in dotted.split(".") if p.startswith("_") and not p.startswith("__")), None)


def private_uses(imports: list[Import]) -> list[str]:
    """Each import by tooling of a name that is not public, as ``importer:line: what``."""
    exported = _all_names("bcc")
    problems = []
    for imp in imports:
        where = f"{imp.importer}:{imp.line}"
        private_module = _private_part(imp.module)
        if private_module is not None:
            problems.append(f"{where}: private module {imp.module}")
        elif imp.name is None or imp.target == f"{imp.module}.{imp.name}":
            continue  # a whole (public) module
        elif imp.name.startswith("_") and not imp.name.startswith("__"):  # __version__ is public
            problems.append(f"{where}: private name {imp.module}.{imp.name}")
        elif not _is_tooling(imp.module) and imp.name not in _all_names(imp.module) | exported:
            problems.append(f"{where}: {imp.module}.{imp.name} is in neither {imp.module}.__all__ nor bcc.__all__")
    return problems


def _tooling_files() -> dict[str, Path]:
    files = {module: path for module, path in MODULES.items() if _is_tooling(module)}
    files.update({f"examples.{path.stem}": path for path in sorted((ROOT / "examples").glob("*.py"))})
    return files


def tooling_imports() -> list[Import]:
    return [imp for importer, path in _tooling_files().items() for imp in _imports(importer, path)]


def private_attributes(importer: str, path: Path) -> list[str]:
    """Private names reached through an imported library module, e.g. ``bcc._io.write_json``."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}  # local name -> the library module it names
    for node in ast.walk(tree):
        for alias in node.names if isinstance(node, (ast.Import, ast.ImportFrom)) else ():
            if isinstance(node, ast.Import):  # import bcc.a.b binds bcc; import bcc.a.b as m binds m
                local, module = (alias.asname, alias.name) if alias.asname else (alias.name.split(".")[0],) * 2
            else:
                local, module = alias.asname or alias.name, f"{_from_module(importer, node)}.{alias.name}"
            if module in MODULES:
                bound[local] = module
    problems = set()
    for node in ast.walk(tree):
        chain, value = [], node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if chain and isinstance(value, ast.Name) and value.id in bound:
            parts = ".".join([bound[value.id], *reversed(chain)]).split(".")
            private = _private_part(".".join(parts))
            if private is not None:
                used = ".".join(parts[: parts.index(private) + 1])
                problems.add(f"{importer}:{node.lineno}: private name {used}")
    return sorted(problems)


# -- tests ------------------------------------------------------------------------------
def test_the_scan_sees_the_library():
    # Guards the checks below against passing vacuously after a layout change.
    imports = library_imports()
    assert {"bcc", "bcc.plan.schedule", "bcc.passes", "bcc.passes.gate_blocks", "bcc.tools.cli"} <= set(MODULES)
    assert any(i.importer == "bcc" and i.target == "bcc.plan.schedule" for i in imports)
    assert any(i.importer == "bcc.passes" and i.target.startswith("bcc.passes.") for i in imports)


def test_scan_resolves_relative_lazy_and_submodule_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "bcc"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..other import g\n    from bcc import sub\n")
    (pkg / "other.py").write_text("import bcc.sub.leaf\nfrom bcc.sub.leaf import f\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {
        "bcc": pkg / "__init__.py", "bcc.sub": pkg / "sub" / "__init__.py",
        "bcc.sub.leaf": pkg / "sub" / "leaf.py", "bcc.other": pkg / "other.py"})
    edges = set(import_graph().edges)
    assert edges == {("bcc.sub", "bcc.sub.leaf"), ("bcc.sub.leaf", "bcc.other"), ("bcc.sub.leaf", "bcc.sub"),
                     ("bcc.other", "bcc.sub.leaf")}
    assert import_cycles(import_graph()) == [["bcc.other", "bcc.sub.leaf"], ["bcc.sub", "bcc.sub.leaf"]]


def test_scan_finds_private_names_in_tooling(tmp_path, monkeypatch):
    files = {"bcc": "__all__ = ['api_name']\n", "bcc._io": "", "bcc.lib": "__all__ = ['pub']\n",
             "bcc.tools": "", "bcc.tools.t": (
                 "import bcc\nimport bcc.lib as L\nfrom bcc import api_name, lib\nfrom bcc._io import w\n"
                 "from bcc.lib import pub, _hidden, unlisted\n"
                 "def f():\n    return bcc._io.w, L._x, lib.pub, bcc.__version__\n")}
    modules = {}
    for name, text in files.items():
        path = tmp_path / (name.replace(".", "_") + ".py")
        path.write_text(text)
        modules[name] = path
    monkeypatch.setattr(sys.modules[__name__], "MODULES", modules)
    imports = _imports("bcc.tools.t", modules["bcc.tools.t"])
    assert private_uses(imports) == [
        "bcc.tools.t:4: private module bcc._io",
        "bcc.tools.t:5: private name bcc.lib._hidden",
        "bcc.tools.t:5: bcc.lib.unlisted is in neither bcc.lib.__all__ nor bcc.__all__"]
    assert private_attributes("bcc.tools.t", modules["bcc.tools.t"]) == [
        "bcc.tools.t:7: private name bcc._io", "bcc.tools.t:7: private name bcc.lib._x"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = import_cycles(graph)

    def where(chain):
        hops = zip(chain, chain[1:] + chain[:1])
        return ", ".join(f"{a} line {'/'.join(map(str, graph.edges[a, b]['lines']))}" for a, b in hops)

    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(
        f"  {' -> '.join(c + c[:1])}   ({where(c)})" for c in cycles)


def test_compiler_never_imports_tooling():
    bad = [f"{i.importer}:{i.line} imports {i.target}" for i in library_imports()
           if _is_tooling(i.target) and not _is_tooling(i.importer)]
    assert not bad, "the compiler must not import bcc.tools (tooling imports the library, never the reverse):\n" + \
        "\n".join("  " + b for b in bad)


def test_tooling_imports_public_names_only():
    problems = private_uses(tooling_imports())
    problems += [p for importer, path in _tooling_files().items() for p in private_attributes(importer, path)]
    assert not problems, ("tooling must use public names (in the module's __all__ or bcc.__all__); make these "
                          "public or stop using them:\n" + "\n".join("  " + p for p in problems))


# The compiler's stages, earliest first (README "How the code is laid out"): a module may
# import its own stage or an earlier one, never a later one. errors, config and _io sit
# below every stage; bcc.api and the package itself above.
STAGES = ["capture", "analyze", "plan", "scale_shift", "passes", "lower", "runtime", "api"]


def _stage(module: str) -> str | None:
    if module == "bcc.passes" or module.startswith("bcc.passes."):
        return "passes"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_stages_import_earlier_stages_only():
    assert {_stage(m) for m in MODULES} >= set(STAGES)  # the scan sees every stage
    bad = []
    for imp in library_imports():
        here, there = _stage(imp.importer), _stage(imp.target)
        if here is not None and there is not None and STAGES.index(there) > STAGES.index(here):
            bad.append(f"{imp.importer}:{imp.line} ({here}) imports {imp.target} ({there})")
    assert not bad, "a stage imports a later one (" + " -> ".join(STAGES) + "):\n" + "\n".join("  " + b for b in bad)
