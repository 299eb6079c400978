"""Fast BLAS for MLX's Linux CPU backend.

The ``mlx[cpu]`` wheel for Linux ships a slow reference BLAS; an OpenBLAS preloaded with
``LD_PRELOAD`` replaces its GEMM (docs/PERFORMANCE.md, "OpenBLAS").  The entry points call
:func:`ensure_fast_blas` first: on Linux, when an OpenBLAS is found and is not loaded yet, the
process re-executes itself once with it preloaded.  Looked for, in order:

1. a system OpenBLAS (``apt-get install libopenblas0-pthread``): faster than the pip build on
   the towers' many small attention matmuls (docs/PERFORMANCE.md);
2. the ``ngsolve-openblas`` wheel (the ``cpu`` extra on x86-64 Linux), built for every x86-64
   core with the plain ``cblas_*`` names MLX calls.

OpenBLAS picks its kernels for the CPU it finds.  An older build that does not recognize a new
CPU falls back to generic ones (``Prescott``: a fraction of the speed); when the library reports
such a core on a CPU with AVX2+FMA or AVX-512, ``OPENBLAS_CORETYPE`` is set for the re-executed
process to the best core the library knows for those flags, unless the user set it already.
``MLX_DSVL_NO_BLAS_REEXEC=1`` turns all of this off.  When no OpenBLAS can be loaded, a hint
says how to get one, once.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from functools import cache
from importlib.util import find_spec
from pathlib import Path

ENV_OFF = "MLX_DSVL_NO_BLAS_REEXEC"
_MARK = "MLX_DSVL_BLAS_REEXECUTED"
_HINTED = "MLX_DSVL_BLAS_HINTED"  # inherited: child processes do not repeat the hint
PIP_PACKAGE = "ngsolve_openblas"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# x86-64 cores by the widest vector kernels OpenBLAS runs on them: 2 = AVX-512, 1 = AVX2+FMA;
# any other reported core (Prescott, Nehalem, Sandybridge, ...) is generic (0).
CORE_LEVEL = {"haswell": 1, "zen": 1, "excavator": 1, "skylakex": 2, "cooperlake": 2, "sapphirerapids": 2}
AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
AVX2 = frozenset({"avx2", "fma"})
# For an AVX-512 CPU, the first of these the library knows whose extra flags the CPU has.
AVX512_CORES = (("SapphireRapids", frozenset({"amx_tile", "amx_bf16", "avx512_fp16"})),
                ("Cooperlake", frozenset({"avx512_bf16"})),
                ("SkylakeX", frozenset()))


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``'s first ``flags`` line); empty when unknown."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_level(flags: Iterable[str]) -> int:
    flags = set(flags)
    return 2 if AVX512 <= flags else 1 if AVX2 <= flags else 0


def choose_coretype(core: str | None, flags: Iterable[str], known: Iterable[str]) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to force, or None to keep the library's own choice.

    core: what ``openblas_get_corename()`` reports; flags: the CPU's; known: the core names the
    library can be forced to.  Forces only a generic core (one without AVX2 kernels: Prescott,
    Nehalem, ...) on a CPU with AVX2+FMA or AVX-512, and only to a core the library knows and
    the CPU runs.  A reported AVX2 core on an AVX-512 CPU is kept: OpenBLAS chooses it itself
    when the OS does not enable AVX-512, and the AVX-512 kernels gain little for float32 GEMM.
    """
    if not core or CORE_LEVEL.get(core.lower(), 0) > 0:
        return None
    flags = set(flags)
    known = {k.lower() for k in known}
    level = cpu_level(flags)
    if level == 2:
        for name, extra in AVX512_CORES:
            if extra <= flags and name.lower() in known:
                return name
    if level >= 1 and "haswell" in known:
        return "Haswell"
    return None


def pip_openblas() -> str | None:
    """The library of the ``ngsolve-openblas`` wheel, if installed (its package is not imported:
    importing it loads the library into this process)."""
    try:
        spec = find_spec(PIP_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        libs = sorted(Path(folder).glob("libopenblas*.so*"))
        if libs:
            return str(libs[0])
    return None


def system_openblas() -> str | None:
    for c in CANDIDATES:
        if Path(c).exists():
            return c
    return None


def find_openblas(with_torch: bool = False) -> str | None:
    """The OpenBLAS to preload: the system one if it loads here, else the pip one.

    with_torch: the process will also run PyTorch (the test suite): pass over builds that export
    ``cblas_sgemm_batch`` (recent ones such as the pip 0.3.33; not Debian 12's 0.3.21):
    preloaded, that symbol replaces MKL's own inside PyTorch, whose batched matmuls (``bmm``,
    ``einsum``) then crash.
    """
    for lib in (system_openblas(), pip_openblas()):
        if lib and library_core(lib) is not None and not (with_torch and _probe(lib)[1]):
            return lib
    return None


def library_core(lib: str) -> str | None:
    """``openblas_get_corename()`` of ``lib`` as a fresh process loads it; None when it cannot be
    loaded (for example the pip wheel without the system's ``libgfortran.so.5``)."""
    return _probe(lib)[0]


@cache
def _probe(lib: str) -> tuple[str | None, bool]:
    """(core name or None, exports ``cblas_sgemm_batch``), asked in a child process so that
    this one neither maps the library nor starts its threads."""
    import subprocess  # only the first process asks; the re-executed one never imports it

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, "-S", "-c", _PROBE, lib], env=env,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None, False
    words = out.stdout.split()
    if out.returncode != 0 or len(words) != 2:
        return None, False
    return words[0], words[1] == "batch"


_PROBE = ("import ctypes, sys; h = ctypes.CDLL(sys.argv[1]); "
          "h.openblas_get_corename.restype = ctypes.c_char_p; "
          "print(h.openblas_get_corename().decode(), 'batch' if hasattr(h, 'cblas_sgemm_batch') else '-')")


def loaded_core() -> str | None:
    """``openblas_get_corename()`` of the OpenBLAS this process runs on (None without one)."""
    lib = loaded_openblas()
    if lib is None:
        return None
    handle = ctypes.CDLL(lib)  # the mapped library itself: dlopen returns its handle
    handle.openblas_get_corename.restype = ctypes.c_char_p
    return handle.openblas_get_corename().decode()


def known_cores(lib: str) -> frozenset[str]:
    """The x86-64 core names ``lib`` can be forced to: those in its table of core names."""
    try:
        data = Path(lib).read_bytes()
    except OSError:
        return frozenset()
    names = {"Haswell", "SkylakeX", "Cooperlake", "SapphireRapids"}
    return frozenset(n for n in names if b"\0" + n.encode() + b"\0" in data)


def loaded_openblas() -> str | None:
    """The path of the OpenBLAS mapped into this process, or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1]
        if path.startswith("/") and "libopenblas" in Path(path).name:
            return path
    return None


def openblas_loaded() -> bool:
    return loaded_openblas() is not None


def preload_env(lib: str, flags: Iterable[str] | None = None) -> dict[str, str]:
    """The environment to add for a process that preloads ``lib``: ``LD_PRELOAD`` and, when
    the library would pick a core below the CPU's (and the user did not choose one),
    ``OPENBLAS_CORETYPE``."""
    env = {"LD_PRELOAD": lib}
    if "OPENBLAS_CORETYPE" in os.environ:
        return env
    flags = cpu_flags() if flags is None else frozenset(flags)
    core = library_core(lib)
    if core and CORE_LEVEL.get(core.lower(), 0) == 0 < cpu_level(flags):  # only then read the file
        forced = choose_coretype(core, flags, known_cores(lib))
        if forced:
            env["OPENBLAS_CORETYPE"] = forced
    return env


def cuda_backend_installed() -> bool:
    """MLX's CUDA wheel is installed: the GPU does the work, the CPU BLAS does not matter."""
    from importlib import metadata  # slow to import; the re-executed process never asks

    for dist in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            metadata.version(dist)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


def hint() -> str:
    """What to install for a fast BLAS, for a process that found none it could load."""
    pip_lib = pip_openblas()
    if pip_lib and library_core(pip_lib):  # passed over: this process runs PyTorch too
        what = ("ngsolve-openblas cannot be preloaded next to PyTorch (its cblas_sgemm_batch "
                "replaces MKL's); for PyTorch processes such as the tests install a system "
                "OpenBLAS: `apt-get install libopenblas0-pthread`")
    elif pip_lib:
        what = (f"{pip_lib} (ngsolve-openblas) does not load: it needs the system's "
                "libgfortran.so.5 (`apt-get install libgfortran5`)")
    else:
        what = ("install it with `pip install ngsolve-openblas` (x86-64; part of the `cpu` extra) "
                "or `apt-get install libopenblas0-pthread`")
    return (f"mlx-dsvl: MLX's Linux CPU backend is over 10x faster with OpenBLAS; {what} "
            f"(set {ENV_OFF}=1 to silence this).")


def ensure_fast_blas(argv: list | None = None, *, with_torch: bool = False) -> None:
    """Re-execute the current command with OpenBLAS preloaded when that helps (Linux only).

    with_torch: the process will also run PyTorch (see :func:`find_openblas`)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_OFF) or os.environ.get(_MARK):
        return
    if openblas_loaded() or cuda_backend_installed():
        return
    lib = find_openblas(with_torch)
    if lib is None:
        if not os.environ.get(_HINTED):
            os.environ[_HINTED] = "1"
            print(hint(), file=sys.stderr)
        return
    env = dict(os.environ)
    add = preload_env(lib)
    add["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
    env.update(add, **{_MARK: "1"})
    args = [sys.executable] + (list(argv) if argv is not None else _own_argv())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def _own_argv() -> list:
    """This interpreter's arguments after the executable, as typed: interpreter options and
    ``-m module`` kept, empty arguments kept, bytes that are not UTF-8 kept (Python decodes
    them with ``surrogateescape``; ``execve`` encodes them back)."""
    return list(sys.orig_argv[1:]) if sys.orig_argv else list(sys.argv)
