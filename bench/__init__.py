"""Benchmarks that print figures (docs/performance.md), each run as `python -m bench.<name>` from the repository root."""
