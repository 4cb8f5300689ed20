"""Synthetic media sources, counting sinks, recorder."""
