"""The performance suite of benchmarks/README.md: `make bench-perf` or `python -m benchmarks.perf [--quick]`.

Every figure is a ratio of two sides measured in alternation (A, B, A, B, ...; medians), so the
load of a shared machine hits both sides alike. One file per measured concept; `__main__` runs them.
"""
