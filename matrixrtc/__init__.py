"""matrixrtc: Python infrastructure for MatrixRTC (Matrix native group calls).

Layout (see README): ``model``/``session``/``e2ee`` are the pure, sans-I/O protocol core;
``matrix``, ``mesh`` and ``livekit`` are asyncio adapters; ``devstack`` starts the real
local stack for tests and demos.
"""

__version__ = "0.1.0"
