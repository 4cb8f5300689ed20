"""sfu: the operator side of MatrixRTC.

``sfu.auth`` is the authorization service (a drop-in for lk-jwt-service);
``sfu.controller`` keeps LiveKit consistent with Matrix (delegated delayed leave, webhooks).
"""

__version__ = "0.1.0"
