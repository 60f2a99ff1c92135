"""Benchmarks (not tests): they measure, print and write results; they assert nothing."""
