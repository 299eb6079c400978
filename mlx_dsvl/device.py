"""Device choice shared by the entry points (generate, train, bench, the app).

``auto`` picks the GPU when MLX has one (Metal on Apple silicon, CUDA with ``mlx[cuda12|13]``),
else the CPU.  The default compute dtype follows (see :func:`mlx_dsvl.loading.default_dtype`):
float32 on the CPU backend, bfloat16 on a GPU.
"""

from __future__ import annotations

import mlx.core as mx

DEVICES = ("auto", "cpu", "gpu")


def gpu_available() -> bool:
    try:
        return bool(mx.is_available(mx.gpu))
    except Exception:  # older MLX without is_available
        return False


def select_device(name: str = "auto") -> mx.Device:
    """Make ``name`` the default MLX device and return it; ``gpu`` without one is an error."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES}")
    if name == "gpu" and not gpu_available():
        raise ValueError(
            "no GPU available to MLX (Metal on Apple silicon, or CUDA via pip install "
            "'mlx-dsvl[cuda12]' / '[cuda13]'); use --device cpu"
        )
    device = mx.gpu if name == "gpu" or (name == "auto" and gpu_available()) else mx.cpu
    mx.set_default_device(device)
    return device


def describe_device() -> str:
    d = mx.default_device()
    info = {}
    try:
        info = mx.device_info()
    except Exception:
        pass
    name = info.get("device_name") or info.get("architecture") or ""
    return f"{d} {name}".strip()
