"""Authorization service: the lk-jwt-service API (OpenID -> LiveKit JWT)."""
