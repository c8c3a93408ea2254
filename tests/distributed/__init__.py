"""Helpers for multi-process training tests (real processes, gloo, the real DeepSpeed engine)."""
