"""Controller: webhooks, delegated delayed leave, room lifecycle."""
