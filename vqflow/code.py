"""Which vqflow source files a module runs, found statically: its imports (at module level or inside a function),
the packages they live in, and transitively everything those import. dvc.yaml declares each stage's closure
as its code (tests/test_stage_deps.py checks it), and the train stage's checkpoint fingerprint digests it."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_file(module: str, root: Path = ROOT) -> Path | None:
    path = root.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported(node: ast.AST, module: str, root: Path = ROOT) -> set[str]:
    """vqflow modules imported anywhere under ``node`` of ``module``'s source."""
    own = module_file(module, root)
    package = module if own is not None and own.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom):
            if item.level:
                base = package.rsplit(".", item.level - 1)[0] if item.level > 1 else package
                target = f"{base}.{item.module}" if item.module else base
            else:
                target = item.module or ""
            if not target.startswith("vqflow"):
                continue
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in item.names if module_file(f"{target}.{alias.name}", root)}
        elif isinstance(item, ast.Import):
            found |= {alias.name for alias in item.names if alias.name.startswith("vqflow")}
    return {m for m in found if module_file(m, root)}


def closure(modules: set[str], root: Path = ROOT, sources: dict[str, str] | None = None) -> set[str]:
    """``modules`` and every vqflow module they run; ``sources``: module texts to use instead of the files."""
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a submodule import runs its packages
        text = (sources or {}).get(module) or module_file(module, root).read_text()
        todo += list(imported(ast.parse(text), module, root))
    return seen


def stage_files(stage: str, root: Path = ROOT, sources: dict[str, str] | None = None) -> list[str]:
    """The source files (relative to the project) that the stage ``vqflow.stages.<stage>`` runs."""
    modules = closure({f"vqflow.stages.{stage}"}, root, sources)
    return sorted(str(module_file(m, root).relative_to(root)) for m in modules)


def digest(files: list[str], root: Path = ROOT) -> str:
    """sha256 of the files' names and bytes (16 hex digits)."""
    sha = hashlib.sha256()
    for name in sorted(files):
        sha.update(name.encode() + b"\0" + (root / name).read_bytes())
    return sha.hexdigest()[:16]
