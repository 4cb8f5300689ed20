"""Full-mesh media engine (I/O) on aiortc with MSC2746 to-device signalling."""
