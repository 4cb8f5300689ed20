"""Media E2EE (pure): LiveKit frame format cryptor, key rings, sender-key manager."""
