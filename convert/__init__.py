"""``python -m convert`` from the repository root: the converter, :mod:`mlx_dsvl.convert`.

The converter lives in the library's namespace (installing mlx-dsvl claims no top-level
``convert`` module); this folder only keeps the repository's short command working.  Installed
elsewhere, use ``python -m mlx_dsvl.convert`` or ``mlx-dsvl-convert`` (same flags, same output).
"""
