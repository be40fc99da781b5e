"""One ``bench_<thing>.py`` per thing measured, shared code in ``common.py``. Run from the repository root,
e.g. ``python -m benchmarks.bench_attention``; ``python -m scripts.run_all`` runs the kernel ones together."""
