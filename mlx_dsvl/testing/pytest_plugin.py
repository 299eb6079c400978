"""pytest plugin (enabled in pyproject's ``addopts``): run the suite with the fast OpenBLAS.

Imported while pytest parses its arguments, before output capturing starts, so re-executing the
process here is safe.  See :mod:`mlx_dsvl.blas`.
"""

from mlx_dsvl.blas import ensure_fast_blas

ensure_fast_blas()
