# The project's service image: `python -m sfu serve` (the authorization service, a drop-in for
# lk-jwt-service; the controller runs inside it). Built without network: the wheels come from
# deploy/wheels/ (`scripts/wheelhouse`, run by `make image`), pinned by
# deploy/requirements-sfu.txt. Secrets are read at run time only (environment or *_FILE paths).
#
#   make image                      # = scripts/wheelhouse && docker build -t matrixrtc/sfu:0.1.0 .
#   docker compose up -d            # compose.yaml builds it too when the tag is missing
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PATH=/opt/venv/bin:$PATH \
    LIVEKIT_JWT_BIND=:8080

COPY deploy/requirements-sfu.txt /tmp/requirements-sfu.txt
COPY deploy/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        --disable-pip-version-check -r /tmp/requirements-sfu.txt \
    && rm -rf /tmp/wheels /tmp/requirements-sfu.txt \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin matrixrtc

# Only the service and the modules it shares with matrixrtc (errors, owned tasks, the pure
# protocol model); no test or client code.
COPY matrixrtc/__init__.py matrixrtc/errors.py matrixrtc/tasks.py matrixrtc/py.typed /app/matrixrtc/
COPY matrixrtc/model/ /app/matrixrtc/model/
COPY sfu/ /app/sfu/
RUN python3 -m compileall -q /app

USER 10001:10001
WORKDIR /app
EXPOSE 8080
# /healthz answers 200 once the service listens; compose.yaml repeats this check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# The service handles SIGTERM itself (graceful stop, also as PID 1); compose adds `init: true`
# so that orphaned worker processes are reaped too.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "sfu"]
CMD ["serve"]
