"""The import graph runs one way (docs/architecture.md): every module of the package, found by walking
the source tree and read with ast, imports only from lower layers or its own package."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import bam_pipeline

PACKAGE = Path(bam_pipeline.__file__).parent
# Lowest first. A module may import its own package and any lower layer, nothing at its layer or above.
LAYERS = {
    "errors": 0,
    "config": 1,
    "model": 2,
    "mixing": 3,
    "interop": 4,
    "store": 4,
    "data": 5,
    "training": 6,
    "eval": 6,
    "stages": 7,
    "sweeps": 7,
    "cli": 8,
    "loading": 8,
    "__main__": 9,
    "__init__": 9,
}
MODEL_THIRD_PARTY = {"torch"}  # the model runs where only torch is installed (make bench-gpu)


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module under the package directory."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts)] = f
    return out


def unit(module: str) -> str:
    """The layer unit of a dotted module name: its top-level package, or the root module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement, at any depth (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def test_every_module_belongs_to_a_layer():
    units = {unit(m) for m in modules()}
    assert units <= set(LAYERS), f"place {sorted(units - set(LAYERS))} in LAYERS and docs/architecture.md"
    assert len(modules()) > 40  # the walk found the package, not an empty directory


def test_imports_run_one_way():
    backwards = []
    for module, path in modules().items():
        mine = unit(module)
        for target, line in imports(path):
            if not target.startswith("bam_pipeline.") and target != "bam_pipeline":
                continue
            theirs = unit(target) if target != "bam_pipeline" else "__init__"
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                backwards.append(f"{path.relative_to(PACKAGE)}:{line} ({mine}) imports {target} ({theirs})")
    assert not backwards, "\n".join(backwards)


def test_the_model_needs_only_torch():
    stdlib = set(sys.stdlib_module_names)
    extra = set()
    for module, path in modules().items():
        if unit(module) == "model":
            for target, _ in imports(path):
                top = target.split(".")[0]
                if top not in stdlib and top != "bam_pipeline" and top not in MODEL_THIRD_PARTY:
                    extra.add(f"{module} imports {target}")
                if target.startswith("bam_pipeline.") and unit(target) not in ("model", "errors"):
                    extra.add(f"{module} imports {target}")
    assert not extra, sorted(extra)
