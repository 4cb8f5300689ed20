"""LiveKit transport (I/O): livekit rtc SDK with our key provider."""
