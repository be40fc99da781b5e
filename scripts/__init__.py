"""Thin end-to-end entry points over library functions; run from the repository root, e.g.
``python -m scripts.run_all`` (every kernel benchmark) or ``python scripts/cpu.py`` (CPU side by side)."""
