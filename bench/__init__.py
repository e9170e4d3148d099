"""Benchmark scripts; figures are recorded in BENCHMARKS.md at the repository root."""
