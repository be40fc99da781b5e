"""Benchmarks for the kernels package. Run from the repository root, e.g. ``python -m benchmarks.run_all``."""
