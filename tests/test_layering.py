"""Layers depend one way: run.py -> kpn_jax; data_prep (builders) -> kpn_jax; never back.
The models know no platform: no CPU plug-in, no native code."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def offending(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path)
                     if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_library_imports_no_builder_and_no_benchmark():
    assert offending("kpn_jax", ("data_prep", "benchmarks", "configs", "run")) == {}


def test_the_models_import_no_platform_code():
    assert offending("kpn_jax/models", ("kpn_jax.cpu", "kpn_jax.kernels", "ctypes")) == {}


def test_run_py_imports_no_benchmark():
    assert not any(m.startswith("benchmarks") or m in ("train_step", "compare_torch")
                   for m in imported_modules(ROOT / "run.py"))
