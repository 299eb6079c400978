"""An OpenAI-compatible HTTP server for DeepSeek-VL: ``python -m mlx_dsvl.server``.

Files: ``__main__`` (command line), ``app`` (routes, errors, streaming), ``schema`` (request
and response shapes, sampling options), ``scheduler`` (the model's worker: batched decoding,
admission, cancellation), ``images`` (where images may come from), ``security`` (API key,
body size).  The server sits on the library (its prefix KV and image-feature caches:
:mod:`mlx_dsvl.caches`); the library never imports it.
"""
