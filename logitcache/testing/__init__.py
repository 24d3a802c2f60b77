"""Helpers for tests, benchmarks and the demo (the toy teacher); not public API."""
