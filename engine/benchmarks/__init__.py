"""Benchmarks that write tables and plots to docs/benchmarks/ (run by `make bench`, not tests)."""
