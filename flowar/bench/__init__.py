"""Benchmarks of the attention backends and of whole-model sampling (issue #3)."""
