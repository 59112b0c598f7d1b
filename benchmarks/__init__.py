"""Benchmarks of nervus against the raw client on the same storage: ``python -m benchmarks.run``."""
