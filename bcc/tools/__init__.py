"""Tooling built on bcc's public API: the CLI, benchmarks, the shipped digits models, metrics and plots."""
