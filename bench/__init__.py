"""Benchmarks: scripts that print figures (and JSON with --json)."""
