"""Imports run one way, and installing the package claims no generic top-level module.

The import graph is read from the sources (``ast``), not from strings: ``import convert``,
``from convert import x``, ``from convert.files import y`` and relative imports are resolved to
the module they name.  The converter lives at ``mlx_dsvl.convert``; the repository root's
``convert/`` only keeps ``python -m convert`` working there.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_dsvl"
# Entry points and test tools above the converter; no other library module may import it.
MAY_IMPORT_CONVERTER = ("mlx_dsvl.convert", "mlx_dsvl.fuse", "mlx_dsvl.testing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path):
    """Every module ``path`` imports (absolute names; ``from a import b`` gives ``a`` and ``a.b``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield node.lineno, mod
            for alias in node.names:
                yield node.lineno, f"{mod}.{alias.name}"


def test_import_walker_resolves_relative_imports(tmp_path):
    f = PACKAGE / "convert" / "to_mlx.py"
    found = {m for _, m in imported_modules(f)}
    assert {"mlx_dsvl.convert.files", "mlx_dsvl.mlx_format", "mlx.core"} <= found


def test_library_never_imports_the_top_level_convert():
    bad, converter_users = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        for line, target in imported_modules(path):
            if target == "convert" or target.startswith("convert."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            if (target == "mlx_dsvl.convert" or target.startswith("mlx_dsvl.convert.")) and not (
                    mod == "mlx_dsvl" or mod.startswith(tuple(p + s for p in MAY_IMPORT_CONVERTER for s in ("", ".")))):
                converter_users.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, bad
    assert not converter_users, converter_users  # the library does not depend on its converter


def test_only_training_imports_training():
    """Adapters are a library module: generation, the server, eval, the converter and the app
    load them without the training package."""
    users = []
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "apps").glob("*.py")]
    for path in sorted(paths):
        mod = module_name(path)
        if mod == "mlx_dsvl.train" or mod.startswith(("mlx_dsvl.train.", "mlx_dsvl.testing")):
            continue
        users += [f"{path.relative_to(ROOT)}:{line} imports {target}" for line, target in imported_modules(path)
                  if target == "mlx_dsvl.train" or target.startswith("mlx_dsvl.train.")]
    assert not users, users


def test_library_never_imports_test_tools():
    """``mlx_dsvl.testing`` is for tests; what the library needs of it (random checkpoints) lives
    in the library."""
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path).startswith("mlx_dsvl.testing"):
            continue
        users += [f"{path.relative_to(ROOT)}:{line} imports {target}" for line, target in imported_modules(path)
                  if target == "mlx_dsvl.testing" or target.startswith("mlx_dsvl.testing.")]
    assert not users, users


# The house's lower rooms: what each may import from the rest of the library.
LOWER_ROOMS = {"mlx_dsvl.models": ("mlx_dsvl.models", "mlx_dsvl.config"),
               "mlx_dsvl.processing": ("mlx_dsvl.processing", "mlx_dsvl.config")}


def test_lower_rooms_never_import_higher_ones():
    """models/ knows nothing of processing, loading, generation or training; processing/ knows
    nothing of the models; no library module imports the app or the benchmarks."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        allowed = next((ok for room, ok in LOWER_ROOMS.items() if mod == room or mod.startswith(room + ".")), None)
        for line, target in imported_modules(path):
            if target.split(".")[0] in ("apps", "benchmarks"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            if allowed and target.startswith("mlx_dsvl") and target != "mlx_dsvl" and not any(
                    target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, bad


def test_package_claims_only_mlx_dsvl():
    from setuptools import find_namespace_packages

    text = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]", text).group(1)
    patterns = re.findall(r'"([^"]+)"', include)
    packages = find_namespace_packages(str(ROOT), include=patterns)
    assert "mlx_dsvl.convert" in packages
    assert all(p == "mlx_dsvl" or p.startswith("mlx_dsvl.") for p in packages), packages
    script = re.search(r'^mlx-dsvl-convert\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    assert script and script.groups() == ("mlx_dsvl.convert.__main__", "main")


def test_console_script_target(capsys, monkeypatch):
    from mlx_dsvl.convert.__main__ import main

    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/mlx-dsvl-convert"])
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mlx-dsvl-convert [-h] --model MODEL --out OUT") and "--to-original" in out


@pytest.mark.slow
@pytest.mark.parametrize("module, prog", [("mlx_dsvl.convert", "python -m mlx_dsvl.convert"),
                                          ("convert", "python -m convert")])
def test_cli_help_from_anywhere_and_from_the_root(module, prog, tmp_path):
    """``python -m mlx_dsvl.convert`` from a folder outside the repository (only the package on
    the path, as when installed); ``python -m convert`` from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if module == "mlx_dsvl.convert":
        # only the package on the path, and a top-level ``convert`` that fails when imported
        # (shadowing any other, e.g. an older editable install's)
        site = tmp_path / "site"
        (site / "convert").mkdir(parents=True)
        (site / "convert" / "__init__.py").write_text("raise ImportError('top-level convert imported')\n")
        (site / "mlx_dsvl").symlink_to(PACKAGE, target_is_directory=True)
        env["PYTHONPATH"], cwd = str(site), tmp_path
    else:
        env["PYTHONPATH"], cwd = str(ROOT), ROOT
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: {prog} [-h] --model MODEL --out OUT"), r.stdout
    assert "--quantize" in r.stdout and "--to-original" in r.stdout
