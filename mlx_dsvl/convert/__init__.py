"""Checkpoint conversion: ``python -m mlx_dsvl.convert`` (``mlx-dsvl-convert``; ``python -m
convert`` from the repository root).

- :mod:`.to_mlx`: original deepseek-ai or ``transformers`` checkpoints -> MLX folder (dtype,
  4/8-bit quantization), streamed tensor by tensor;
- :mod:`.to_original`: MLX folder -> original layout (dequantized, adapters fused);
- :mod:`.keymaps`: original <-> ``transformers`` tensor names;
- :mod:`.hf_config`: ``transformers`` config -> original ``config.json`` and processor files;
- :mod:`.sources`: any supported checkpoint as one lazy MLX-layout view (reading folders, the
  layout maps and the strict check are :mod:`mlx_dsvl.model_folder`'s);
- :mod:`.files` (safetensors, shards), :mod:`.job` (the frame: checks, the staged output
  folder of :mod:`mlx_dsvl.outputs`).

Importing this package is cheap (nothing below is imported here), so that the test tools can
use :mod:`.keymaps` alone.
"""
