"""Repo-root conftest: makes `configs` and `benchmarks` importable in tests."""
