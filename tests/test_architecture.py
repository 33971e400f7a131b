"""The architecture as a user and a maintainer rely on it: typed errors at every raise site, the layer contracts,
``__all__`` on every public module, a torch-free floor, and CLI listing verbs that never import torch."""

from __future__ import annotations

import ast
import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptkit

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted((ROOT / "ckptkit").rglob("*.py")) + sorted((ROOT / "adapters").glob("*.py"))  # rglob skips the link
BUILTIN_ERRORS = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
# Raising these is how a Python protocol answers (module __getattr__ -> AttributeError, iterators -> StopIteration).
PROTOCOL = {("__getattr__", "AttributeError"), ("__next__", "StopIteration")}


def _raise_sites() -> list[tuple[str, int, str, str]]:
    """(file, line, enclosing function, raised class name) for every ``raise X(...)`` / ``raise X``."""
    out = []
    for path in LIBRARY:
        tree = ast.parse(path.read_text(), str(path))

        def visit(node: ast.AST, func: str, path: Path = path) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func = node.name
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name):
                    out.append((str(path.relative_to(ROOT)), node.lineno, func, exc.id))
            for child in ast.iter_child_nodes(node):
                visit(child, func)

        visit(tree, "<module>")
    return out


def test_no_raise_site_raises_a_bare_builtin_or_the_root_class() -> None:
    sites = _raise_sites()
    assert len(sites) > 50  # the walk sees the library
    bad = sorted({(f, line, cls) for f, line, func, cls in sites
                  if (cls in BUILTIN_ERRORS and (func, cls) not in PROTOCOL) or cls == "CkptkitError"})  # fmt: skip
    assert not bad, "raise a typed error from ckptkit.errors (it also derives from the builtin):\n" + "\n".join(
        f"  {f}:{line}: raise {cls}" for f, line, cls in bad
    )


def test_every_error_derives_from_the_root_and_a_builtin() -> None:
    from ckptkit import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.CkptkitError), name
        if cls is not errors.CkptkitError:
            assert any(b in BUILTIN_ERRORS - {"Exception", "BaseException"} for b in (c.__name__ for c in cls.__mro__)), name


def test_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    if lint is None:
        if os.environ.get("CI"):
            pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".ci")}
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in out.stdout, out.stdout[-3000:]


def _public_modules() -> list[str]:
    mods = []
    for path in LIBRARY:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "adapters":
            parts = ["ckptkit", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or parts[-1] == "__main__":
            continue
        mods.append(".".join(parts))
    return mods


def test_every_public_module_has_all_and_the_top_level_stays_short() -> None:
    import importlib

    mods = _public_modules()
    assert "ckptkit.storage.repository" in mods and "ckptkit.adapters.hf" in mods
    missing = []
    for m in mods:
        if m.startswith("ckptkit.adapters.") and m.split(".")[-1] in ("hf", "timm", "detection"):
            continue  # their frameworks are optional; checked below without importing them
        mod = importlib.import_module(m)
        if not isinstance(getattr(mod, "__all__", None), list):
            missing.append(m)
        for name in getattr(mod, "__all__", []):
            assert hasattr(mod, name), f"{m}.__all__ lists {name}, which it does not define"
    for m in ("hf", "timm", "detection"):
        tree = ast.parse((ROOT / "adapters" / f"{m}.py").read_text())
        if not any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
                   for n in tree.body):  # fmt: skip
            missing.append(f"ckptkit.adapters.{m}")
    assert not missing, f"public modules without __all__: {missing}"
    assert len(ckptkit.__all__) <= 12
    for name in ckptkit.__all__:
        assert getattr(ckptkit, name) is not None


FLOOR = "import sys, ckptkit.errors, ckptkit.schema, ckptkit.hashing, ckptkit.storage, ckptkit.engine.manifests"


def test_the_floor_and_the_storage_layer_import_no_torch() -> None:
    code = FLOOR + "; print(sorted({'torch', 'numpy', 'safetensors'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("verb", [["ls"], ["ls", "--json"], ["show"], ["log"], ["lineage", "--format", "json"],
                                  ["gc", "--dry-run"]])  # fmt: skip
def test_cli_verbs_that_read_manifests_never_import_torch(tmp_path: Path, verb: list[str]) -> None:
    repo = str(tmp_path / "repo")
    mgr = ckptkit.CheckpointManager(repo, {"model": torch.nn.Linear(3, 3)})
    mgr.save(1, metrics={"loss": 0.5})
    mgr.save(2, metrics={"loss": 0.25})
    mgr.close()
    code = ("import sys; from ckptkit.cli import run; sys.argv = ['ckptkit'] + sys.argv[1:]\n"
            "try:\n    run()\nfinally:\n"
            "    print(json.dumps(sorted({'torch', 'numpy', 'safetensors'} & set(sys.modules))), file=sys.stderr)")
    code = "import json\n" + code
    out = subprocess.run([sys.executable, "-c", code, verb[0], repo, *verb[1:]], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1]) == [], f"`ckptkit {' '.join(verb)}` imported torch"
    assert ("kept 2" if verb[0] == "gc" else "step-00000002") in out.stdout


def test_every_subpackage_is_in_the_distribution() -> None:
    """pyproject lists packages by name: a new folder left out would be missing from a wheel (not from -e)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ckptkit").rglob("__init__.py")}
    assert found | {"ckptkit.adapters"} <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
