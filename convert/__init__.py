"""Checkpoint conversion: ``python -m convert``.

- :mod:`convert.to_mlx`: original deepseek-ai or ``transformers`` checkpoints -> MLX folder
  (dtype, 4/8-bit quantization), streamed tensor by tensor;
- :mod:`convert.to_original`: MLX folder -> original layout (dequantized, LoRA adapters fused);
- :mod:`convert.keymaps`: original <-> ``transformers`` tensor names;
- :mod:`convert.hf_config`: ``transformers`` config -> original ``config.json`` and processor files;
- :mod:`convert.sources`, :mod:`convert.files`: reading inputs, writing outputs.
"""
