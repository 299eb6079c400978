"""Tools for tests and benchmarks: random checkpoints in the original deepseek-ai layout."""
