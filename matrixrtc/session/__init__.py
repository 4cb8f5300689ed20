"""RTC session logic (pure): memberships -> participants, expiry, transport choice, and the
own-membership state machine (delayed leave, heartbeat, refresh), driven by an injected clock."""
