"""Benchmarks for blockws; run a module with ``python -m benchmarks.<name>``."""
