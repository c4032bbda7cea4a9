"""Print which of our packages imports which, from the sources (``ast``, nothing is imported).

    python scripts/import-graph.py            # package -> packages it imports
    python scripts/import-graph.py --modules  # module -> our modules it imports

tests/test_layering.py holds the rules this graph must obey.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {
    "prefill_bootstrap": ROOT / "prefill_bootstrap",
    "prefill_bootstrap.shared": ROOT / "shared",
    "prefill_bootstrap.client": ROOT / "client",
    "prefill_bootstrap.service": ROOT / "service",
}


def our_modules() -> dict[str, Path]:
    """Every module of the distribution, by dotted name."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(path: Path, package: str) -> set[str]:
    """The ``prefill_bootstrap`` modules a file imports, at any depth (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("prefill_bootstrap")}


def package_of(module: str) -> str:
    """The layer a module belongs to: the longest of our package names it starts with. The root
    package's modules are layers of their own: ``prefill_bootstrap`` holds only the version,
    ``prefill_bootstrap.cli`` sits above both halves."""
    layer = max((p for p in PACKAGE_DIRS if module == p or module.startswith(p + ".")), key=len)
    return module if layer == "prefill_bootstrap" else layer


def module_graph() -> dict[str, set[str]]:
    modules = our_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in imports_of(path, package) if m in modules and m != name}
    return graph


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, imported in module_graph().items():
        source = package_of(module)
        graph[source].update(package_of(m) for m in imported if package_of(m) != source)
        graph.setdefault(source, set())
    return dict(graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="module level, not packages")
    args = parser.parse_args()
    graph = module_graph() if args.modules else package_graph()
    for source in sorted(graph):
        targets = ", ".join(sorted(graph[source])) or "(nothing of ours)"
        print(f"{source} -> {targets}")


if __name__ == "__main__":
    main()
