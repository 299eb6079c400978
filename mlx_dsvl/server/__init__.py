"""An OpenAI-compatible HTTP server for DeepSeek-VL: ``python -m mlx_dsvl.server``.

The library never imports this package."""
