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
    "processes": 0,
    "config": 1,
    "ranks": 1,
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
    "launcher": 8,
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


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, whether relative) of every import statement, at any depth (lazy imports too),
    relative imports resolved against ``module``'s package (``from . import x`` as its module ``x``)."""
    package = module.split(".")[:-1]  # a module's package; for an __init__, its own package
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno, False))
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1])
            names = [node.module] if node.module else [a.name for a in node.names]
            found += [(f"{base}.{name}", node.lineno, True) for name in names]
    return found


def test_every_module_belongs_to_a_layer():
    units = {unit(m) for m in modules()}
    assert units <= set(LAYERS), f"place {sorted(units - set(LAYERS))} in LAYERS and docs/architecture.md"
    assert len(modules()) > 40  # the walk found the package, not an empty directory


def test_imports_run_one_way():
    backwards = []
    for module, path in modules().items():
        mine = unit(module)
        for target, line, _ in imports(path, module):
            if not target.startswith("bam_pipeline.") and target != "bam_pipeline":
                continue
            theirs = unit(target) if target != "bam_pipeline" else "__init__"
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                backwards.append(f"{path.relative_to(PACKAGE)}:{line} ({mine}) imports {target} ({theirs})")
    assert not backwards, "\n".join(backwards)


def test_the_model_needs_only_torch():
    """model/ imports torch, the standard library, its own modules and ``errors``, nothing else; those two
    relatively (``from .layers``, ``from ..errors``): the custom Hugging Face export ships the files flat."""
    stdlib = set(sys.stdlib_module_names)
    extra = set()
    for module, path in modules().items():
        if unit(module) != "model":
            continue
        for target, line, relative in imports(path, module):
            top = target.split(".")[0]
            ours = relative and (target == "bam_pipeline.errors" or target.startswith("bam_pipeline.model."))
            if not (ours or top in stdlib or top in MODEL_THIRD_PARTY):
                extra.add(f"{path.relative_to(PACKAGE)}:{line} imports {target}"
                          + (" by its absolute name" if top == "bam_pipeline" and not relative else ""))
    assert not extra, sorted(extra)
