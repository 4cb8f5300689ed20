"""Wire types (pure): memberships in both dialects, transports, notifications, key messages,
MSC2746 call events, LiveKit room-alias and identity hashes. Parsers never raise: they log
and return None for invalid input."""
