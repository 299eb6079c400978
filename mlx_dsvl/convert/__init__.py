"""Checkpoint conversion: ``python -m mlx_dsvl.convert`` (``mlx-dsvl-convert``).

Importing this package imports nothing below it, so the test tools can use :mod:`.keymaps` alone.
"""
