"""Benchmarks and the app's soak test, run from the repository root: `python -m benchmarks.<name>`.

Not part of the library: `hones_core` never imports this package at module level (its
`bench-rank` and `bench-app` commands import it when they run).
"""
