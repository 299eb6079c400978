"""pytest plugin (enabled in pyproject's ``addopts``): run the suite with the fast OpenBLAS.

Imported while pytest parses its arguments, before output capturing starts, so re-executing the
process here is safe.  See :mod:`mlx_dsvl.blas`; the parity tests run PyTorch in this process,
so only an OpenBLAS that leaves PyTorch's MKL alone is preloaded.

The commands the tests start inherit this process's BLAS (``LD_PRELOAD``) and
``MLX_DSVL_NO_BLAS_REEXEC=1``: they neither re-execute nor print the "install OpenBLAS" hint,
so what they write to stderr is the same on every machine (tests count those lines).
"""

import os

from mlx_dsvl.blas import ENV_OFF, ensure_fast_blas

ensure_fast_blas(with_torch=True)
os.environ[ENV_OFF] = "1"
