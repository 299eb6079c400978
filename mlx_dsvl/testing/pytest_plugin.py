"""pytest plugin (enabled in pyproject's ``addopts``): run the suite with the fast OpenBLAS.

Imported before output capturing starts, so re-executing the process here is safe; only an
OpenBLAS that leaves PyTorch's MKL alone is preloaded (the parity tests run PyTorch in-process).
Commands the tests start inherit it and ``MLX_DSVL_NO_BLAS_REEXEC=1``, so their stderr is the
same on every machine (tests count those lines).
"""

import os

from mlx_dsvl.blas import ENV_OFF, ensure_fast_blas

ensure_fast_blas(with_torch=True)
os.environ[ENV_OFF] = "1"
