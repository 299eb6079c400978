"""Fast BLAS for MLX's Linux CPU backend.

The ``mlx[cpu]`` wheel for Linux ships a slow reference BLAS.  A system OpenBLAS preloaded with
``LD_PRELOAD`` replaces its GEMM (a real-size SigLIP-L forward: 170 s -> 14 s on 2 cores).  The
entry points call :func:`ensure_fast_blas` first: on Linux, when a system OpenBLAS exists and is
not loaded yet, the process re-executes itself once with it preloaded.  Set
``MLX_DSVL_NO_BLAS_REEXEC=1`` to turn this off.  When no OpenBLAS is installed, a one-time hint
names the Debian/Ubuntu package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

ENV_OFF = "MLX_DSVL_NO_BLAS_REEXEC"
_MARK = "MLX_DSVL_BLAS_REEXECUTED"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_hinted = False


def find_openblas() -> Optional[str]:
    for c in CANDIDATES:
        if Path(c).exists():
            return c
    return None


def openblas_loaded() -> bool:
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def cuda_backend_installed() -> bool:
    """MLX's CUDA wheel is installed: the GPU does the work, the CPU BLAS does not matter."""
    from importlib import metadata

    for dist in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            metadata.version(dist)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


def ensure_fast_blas(argv: Optional[list] = None) -> None:
    """Re-execute the current command with OpenBLAS preloaded when that helps (Linux only)."""
    global _hinted
    if not sys.platform.startswith("linux") or os.environ.get(ENV_OFF) or os.environ.get(_MARK):
        return
    if openblas_loaded() or cuda_backend_installed():
        return
    lib = find_openblas()
    if lib is None:
        if not _hinted:
            _hinted = True
            print(
                "mlx-dsvl: MLX's Linux CPU backend is much faster with a system OpenBLAS; install "
                "it with `apt-get install libopenblas0-pthread` (set MLX_DSVL_NO_BLAS_REEXEC=1 to "
                "silence this).",
                file=sys.stderr,
            )
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
    env[_MARK] = "1"
    args = [sys.executable] + (list(argv) if argv is not None else _own_argv())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def _own_argv() -> list:
    """The current interpreter arguments (``-m module`` preserved) for re-execution."""
    try:
        cmdline = Path("/proc/self/cmdline").read_bytes().split(b"\0")[1:]
        args = [a.decode() for a in cmdline if a]
        if args:
            return args
    except OSError:
        pass
    return list(sys.argv)
