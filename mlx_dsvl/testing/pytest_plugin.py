"""pytest plugin (enabled in pyproject's ``addopts``): run the suite with the fast OpenBLAS.

Imported while pytest parses its arguments, before output capturing starts, so re-executing the
process here is safe.  See :mod:`mlx_dsvl.blas`; the parity tests run PyTorch in this process,
so only an OpenBLAS that leaves PyTorch's MKL alone is preloaded.
"""

from mlx_dsvl.blas import ensure_fast_blas

ensure_fast_blas(with_torch=True)
