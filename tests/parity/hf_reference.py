"""Re-export: the transformers reference builder lives in :mod:`mlx_dsvl.testing.hf_reference`
(benchmarks use it too)."""

from mlx_dsvl.testing.hf_reference import build_hf_model, original_state_dict, reference_inputs  # noqa: F401
