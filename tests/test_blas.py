"""mlx_dsvl.blas: which OpenBLAS is preloaded, with which core, and the hint when there is none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mlx_dsvl import blas

SKX = blas.AVX512 | blas.AVX2 | {"sse4_2", "avx"}  # Skylake-SP: AVX-512 without bf16
ALL_KNOWN = {"Haswell", "SkylakeX", "Cooperlake", "SapphireRapids"}
OLD_KNOWN = {"Haswell", "SkylakeX", "Cooperlake"}  # OpenBLAS 0.3.21 (Debian 12)
NO_OPENBLAS = ("no OpenBLAS can be loaded here: `pip install ngsolve-openblas` (x86-64, the `cpu` "
               "extra) or `apt-get install libopenblas0-pthread`")


@pytest.mark.parametrize("core,flags,known,expected", [
    # generic cores on CPUs that run better ones
    ("Prescott", SKX, ALL_KNOWN, "SkylakeX"),
    ("Nehalem", SKX | {"avx512_bf16"}, ALL_KNOWN, "Cooperlake"),
    ("Prescott", SKX | {"avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16"}, ALL_KNOWN, "SapphireRapids"),
    ("Prescott", SKX | {"avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16"}, OLD_KNOWN, "Cooperlake"),
    ("prescott", SKX | {"amx_tile", "amx_bf16", "avx512_fp16"}, OLD_KNOWN, "SkylakeX"),  # no avx512_bf16
    ("Sandybridge", {"avx", "avx2", "fma"}, OLD_KNOWN, "Haswell"),
    ("Prescott", {"avx2", "fma", "avx512f", "avx512cd"}, OLD_KNOWN, "Haswell"),  # Xeon Phi: no bw/dq/vl
    ("Prescott", SKX, {"Haswell"}, "Haswell"),  # the library knows no AVX-512 core
    # nothing to gain, nothing safe, or nothing known
    ("Prescott", {"avx", "sse4_2"}, ALL_KNOWN, None),  # no AVX2
    ("Prescott", {"avx2"}, ALL_KNOWN, None),  # AVX2 without FMA
    ("Prescott", SKX, set(), None),
    ("Haswell", SKX, ALL_KNOWN, None),  # an AVX2 core the library chose on purpose
    ("Zen", SKX | {"avx512_bf16"}, ALL_KNOWN, None),
    ("Cooperlake", SKX | {"avx512_bf16"}, ALL_KNOWN, None),
    ("NEOVERSEN1", {"asimd", "fp"}, set(), None),  # aarch64
    (None, SKX, ALL_KNOWN, None),
])
def test_choose_coretype(core, flags, known, expected):
    assert blas.choose_coretype(core, flags, known) == expected


def test_cpu_flags_and_known_cores(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                    "flags\t\t: fpu sse avx2 fma avx512f\nbugs\t\t: none\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert blas.cpu_flags(str(info)) == {"fpu", "sse", "avx2", "fma", "avx512f"}
    assert blas.cpu_flags(str(tmp_path / "missing")) == frozenset()
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"\x7fELF...\0Prescott\0Haswell\0SkylakeX\0Cooperlake\0Unknown\0"
                    b"sgemm_kernel_SAPPHIRERAPIDS\0")  # only the core-name table counts
    assert blas.known_cores(str(lib)) == {"Haswell", "SkylakeX", "Cooperlake"}


def test_a_library_that_cannot_load_is_passed_over(tmp_path, monkeypatch):
    broken = tmp_path / "libopenblasp-r0.3.33.so"
    broken.write_bytes(b"not a shared object")  # as the pip wheel without libgfortran.so.5
    assert blas.library_core(str(broken)) is None
    monkeypatch.setattr(blas, "pip_openblas", lambda: str(broken))
    system = blas.system_openblas()
    expected = system if system and blas.library_core(system) else None
    assert blas.find_openblas() == expected


def test_the_hint_appears_once_when_no_openblas_loads(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "linux")
    for var in (blas.ENV_OFF, blas._MARK):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(blas._HINTED, "")  # restored after the test
    monkeypatch.setattr(blas, "openblas_loaded", lambda: False)
    monkeypatch.setattr(blas, "cuda_backend_installed", lambda: False)
    monkeypatch.setattr(blas, "find_openblas", lambda with_torch=False: None)
    monkeypatch.setattr(blas, "pip_openblas", lambda: None)
    blas.ensure_fast_blas()
    blas.ensure_fast_blas()
    err = capsys.readouterr().err
    assert err.count("mlx-dsvl:") == 1
    assert "pip install ngsolve-openblas" in err and "apt-get install libopenblas0-pthread" in err
    assert os.environ[blas._HINTED] == "1"  # inherited: child processes stay quiet too
    monkeypatch.setattr(blas, "pip_openblas", lambda: "/x/libopenblasp-r0.3.33.so")
    assert "/x/libopenblasp-r0.3.33.so (ngsolve-openblas) does not load" in blas.hint()
    assert "apt-get install libgfortran5" in blas.hint()
    monkeypatch.setattr(blas, "library_core", lambda lib: "Haswell")  # loads, passed over for torch
    assert "next to PyTorch" in blas.hint() and "apt-get install libopenblas0-pthread" in blas.hint()


def test_the_system_library_comes_first_and_with_torch_passes_over_a_clashing_one(monkeypatch):
    monkeypatch.setattr(blas, "pip_openblas", lambda: "/pip/libopenblasp-r0.3.33.so")
    monkeypatch.setattr(blas, "system_openblas", lambda: "/usr/lib/libopenblas.so.0")
    monkeypatch.setattr(blas, "library_core", lambda lib: "Haswell")
    clashing = {"/pip/libopenblasp-r0.3.33.so"}
    monkeypatch.setattr(blas, "_probe", lambda lib: ("Haswell", lib in clashing))
    assert blas.find_openblas() == blas.find_openblas(with_torch=True) == "/usr/lib/libopenblas.so.0"
    monkeypatch.setattr(blas, "system_openblas", lambda: None)
    assert blas.find_openblas() == "/pip/libopenblasp-r0.3.33.so"
    assert blas.find_openblas(with_torch=True) is None
    monkeypatch.setattr(blas, "system_openblas", lambda: "/usr/lib/libopenblas.so.0")
    clashing.add("/usr/lib/libopenblas.so.0")  # a newer system build exports it too
    assert blas.find_openblas(with_torch=True) is None


@pytest.mark.slow
def test_the_pip_library_exports_what_the_torch_check_looks_for():
    """For real: ngsolve-openblas 0.3.33 exports cblas_sgemm_batch (so the test suite, which runs
    PyTorch, does not preload it), and loading it in PyTorch's process makes bmm crash."""
    pip_lib = blas.pip_openblas()
    if pip_lib is None or blas.library_core(pip_lib) is None:
        pytest.skip("the pip OpenBLAS is not installed or does not load: `pip install ngsolve-openblas`")
    assert blas._probe(pip_lib)[1]
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    code = "import torch; torch.bmm(torch.ones(4, 8, 8), torch.ones(4, 8, 8)); print('ok')"
    crash = subprocess.run([sys.executable, "-c", code], env={**env, "LD_PRELOAD": pip_lib},
                           capture_output=True, text=True, timeout=120)
    clean = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=120)
    assert clean.stdout.strip() == "ok"
    assert crash.returncode != 0  # the reason for with_torch


def _user_env(**env_changes) -> dict:
    """The environment of a command a user's shell starts: nothing preloaded, re-execution on."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", blas._MARK, blas.ENV_OFF, "OPENBLAS_CORETYPE")}
    env.update(env_changes)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _child(code: str, *args, **env_changes) -> list:
    """Run ``code`` (then ``args``) after ``ensure_fast_blas()`` in a fresh interpreter as a
    user's shell starts it; its last line of output, split."""
    out = subprocess.run([sys.executable, "-c", code, *args], env=_user_env(**env_changes),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1].split()


REPORT = ("import os, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); "
          "print(os.environ.get('OPENBLAS_CORETYPE', '-'), os.path.realpath(b.loaded_openblas() or '-'), "
          "b.loaded_core() or '-')")


def _need_openblas() -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("preloading OpenBLAS is for MLX's Linux CPU backend")
    lib = blas.find_openblas()
    if lib is None or blas.cuda_backend_installed():
        pytest.skip(NO_OPENBLAS if lib is None else "MLX's CUDA backend: no preloading")
    return lib


def test_the_preloaded_core_is_one_this_cpu_runs_well():
    """For real: the re-executed process runs on the chosen library, and its core is not a
    generic one when the CPU has AVX2+FMA or AVX-512."""
    lib = _need_openblas()
    forced, loaded, core = _child("import mlx_dsvl.blas as b; b.ensure_fast_blas(); " + REPORT)
    assert loaded == os.path.realpath(lib)
    level = blas.cpu_level(blas.cpu_flags())
    if level:
        assert blas.CORE_LEVEL.get(core.lower(), 0) >= 1, (core, forced)
    if forced != "-":
        assert forced.lower() == core.lower()


def test_a_generic_core_is_replaced_before_the_reexec():
    """An old library on a new CPU reports a generic core: injected here (this machine's library
    may know its CPU), the re-executed process then runs the forced core for real."""
    lib = _need_openblas()
    flags = blas.cpu_flags()
    expected = blas.choose_coretype("Prescott", flags, blas.known_cores(lib))
    forced, loaded, core = _child(
        "import mlx_dsvl.blas as b; b.library_core = lambda lib: 'Prescott'; b.ensure_fast_blas(); " + REPORT)
    assert loaded == os.path.realpath(lib)
    if expected is None:
        assert forced == "-"
        pytest.skip(f"this CPU has neither AVX2+FMA nor AVX-512 (flags level {blas.cpu_level(flags)})")
    assert forced == expected and core.lower() == expected.lower()


def test_a_coretype_the_user_set_is_kept():
    _need_openblas()
    forced, _, core = _child(
        "import mlx_dsvl.blas as b; b.library_core = lambda lib: 'Prescott'; b.ensure_fast_blas(); " + REPORT,
        OPENBLAS_CORETYPE="Prescott")
    assert forced == "Prescott" and core == "Prescott"


def test_the_pip_openblas_is_preloaded_where_there_is_no_system_one():
    if not sys.platform.startswith("linux"):
        pytest.skip("preloading OpenBLAS is for MLX's Linux CPU backend")
    pip_lib = blas.pip_openblas()
    if pip_lib is None:
        pytest.skip("the pip OpenBLAS is not installed: `pip install ngsolve-openblas` "
                    "(x86-64 Linux; part of the `cpu` extra)")
    if blas.library_core(pip_lib) is None:
        pytest.skip(f"{pip_lib} does not load here: `apt-get install libgfortran5`")
    _, loaded, core = _child("import mlx_dsvl.blas as b; b.system_openblas = lambda: None; "
                             "b.ensure_fast_blas(); " + REPORT)
    assert loaded == os.path.realpath(pip_lib) and core != "-"
    level = blas.cpu_level(blas.cpu_flags())
    assert level == 0 or blas.CORE_LEVEL.get(core.lower(), 0) >= 1, core  # its core fits the CPU


def test_the_reexecuted_process_gets_the_arguments_as_typed():
    """Empty arguments (``--system ''``, one in the middle, one last) and bytes that are not UTF-8
    reach the re-executed process unchanged."""
    _need_openblas()
    args = ("--system", "", "two words", "", b"caf\xe9.png", "")
    code = ("import os, sys, mlx_dsvl.blas as b; b.ensure_fast_blas(); "
            "print(b.openblas_loaded(), sys.argv[0], ','.join(os.fsencode(a).hex() for a in sys.argv[1:]))")
    loaded, first, typed = _child(code, *args)
    assert loaded == "True" and first == "-c"
    assert typed.split(",") == [os.fsencode(a).hex() for a in args]


def _generate(*args) -> subprocess.CompletedProcess:
    """``python -m mlx_dsvl.generate ARGS`` as a user's shell starts it (it re-executes itself)."""
    return subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", *args], env=_user_env(),
                          capture_output=True, timeout=300)


@pytest.mark.slow
def test_generate_takes_an_empty_system_prompt_and_a_latin1_file_name(tiny_dir, tmp_path):
    _need_openblas()
    image = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")
    Image.new("RGB", (32, 32), "red").save(image)
    out = _generate("--model", str(tiny_dir), "--system", "", "--image", image, "--prompt", "hi",
                    "--max-tokens", "2")
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    missing = _generate("--model", str(tiny_dir), "--image", bytes(tmp_path) + b"/na\xefve.png",
                        "--prompt", "hi")
    assert missing.returncode == 1 and b"Traceback" not in missing.stderr
    line, = missing.stderr.decode(errors="replace").splitlines()
    assert line.startswith("error: image file not found:") and "na" in line and "ve.png" in line
