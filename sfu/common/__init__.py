"""Pieces both the authorization service (``sfu.auth``) and the controller (``sfu.controller``)
use: the SSRF-guarded HTTP client, Matrix server-name parsing and the Prometheus metrics.

Nothing here imports ``sfu.auth`` or ``sfu.controller``: dependencies run one way,
``sfu.auth`` → ``sfu.controller`` → ``sfu.common``.
"""
