"""Homeserver adapter (I/O): matrix-nio[e2e] plus the endpoints nio lacks."""
