"""``python -m convert ...`` (repository root) = ``python -m mlx_dsvl.convert ...``."""

import sys

from mlx_dsvl.convert.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m convert"))
