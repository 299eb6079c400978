"""Checkpoint conversion helpers (original deepseek-ai layout <-> ``transformers`` layout)."""
