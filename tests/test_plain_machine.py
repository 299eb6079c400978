"""The README's test command on a plain Linux machine (no OpenBLAS), simulated on any machine.

Every interpreter of a nested pytest run gets a ``sitecustomize`` that hides OpenBLAS from
:mod:`mlx_dsvl.blas` (as on a machine without it); the tests that count the lines a command
writes to stderr must still pass: the hint about OpenBLAS may appear in pytest's own output, never
in the commands the tests start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SITE = """\
import os
if os.environ.get("MLX_DSVL_TEST_NO_OPENBLAS"):
    import mlx_dsvl.blas as _blas
    _blas.find_openblas = lambda *a, **k: None  # a machine without OpenBLAS
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenBLAS preloading is Linux-only")
def test_stderr_counting_tests_pass_without_openblas(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = {k: v for k, v in os.environ.items()  # a user's shell: nothing preloaded, nothing turned off
           if k not in ("LD_PRELOAD", "MLX_DSVL_BLAS_REEXECUTED", "MLX_DSVL_NO_BLAS_REEXEC")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env["MLX_DSVL_TEST_NO_OPENBLAS"] = "1"
    probe = subprocess.run([sys.executable, "-c", "import mlx_dsvl.blas as b; print(b.find_openblas())"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "None", probe.stderr  # the simulation is in force
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_generate.py", "-k",
         "test_cli_bad_input_one_clear_line and (too_many_images or too_long)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert sum("OpenBLAS" in line for line in r.stderr.splitlines()) <= 1, r.stderr  # the hint, once at most
