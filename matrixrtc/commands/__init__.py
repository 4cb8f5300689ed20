"""CLI commands. Each module defines ``register(subparsers)``; ``matrixrtc.cli`` lists them."""
