"""The packages form layers: each imports only from the layers below it, so there is no import cycle.

Read from the source with `ast` (every `import ditq...` / `from ditq... import`, at module level or inside
functions), so a lazy import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ditq"
# bottom to top; a package may import from its own and from lower ranks only
LAYERS = [
    {"errors", "_version", "names"},
    {"registry", "host"},
    {"io", "gguf"},
    {"formats"},
    {"models"},
    {"lora"},
    {"quant"},
    {"interop"},
    {"prompts"},
    {"runs"},
    {"metrics", "stats"},
    {"report"},
    {"bench"},
    {"cli"},
    {"__init__", "__main__"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "ditq" else [f"ditq.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "ditq":
                yield node.lineno, parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    packages = {_package(p) for p in SRC.rglob("*.py")}
    assert packages <= set(RANK), sorted(packages - set(RANK))


def test_packages_import_only_from_below():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package(path)
        for line, target in _imports(path):
            if target not in RANK:  # a submodule of the package API such as ditq.__version__
                target = "__init__"
            if target != pkg and RANK[target] >= RANK[pkg]:
                wrong.append(f"{path.relative_to(SRC)}:{line}: {pkg} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_storage_layer_imports_no_package_above_it():
    above = {p for p, r in RANK.items() if r > RANK["formats"]}
    for path in (SRC / "formats").rglob("*.py"):
        assert not {t for _, t in _imports(path)} & above, path
