"""Benchmarks, run with `make bench` or `python -m benchmarks`; outside the test suite."""
