# The README's two commands. Each does its own set-up (scripts/bootstrap.sh).
.PHONY: test test-media demo web bootstrap lint typecheck unit image

VENV := .venv/bin

bootstrap:
	./scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports --no-cache

typecheck: bootstrap
	$(VENV)/mypy

# Whole suite, inside a private network namespace (scripts/in-netns).
test: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/lint-imports --no-cache
	@# The pure core's coverage comes from its own (unit) tests; the real-stack suites run untraced,
	@# since tracing every media frame through e2ee/ would slow them for no information.
	./scripts/in-netns $(VENV)/python -m coverage run -m pytest -q -p no:cacheprovider tests/unit -m "not media_matrix" $(PYTEST_ARGS)
	@echo "branch coverage of the pure core (model, session, e2ee), at least 90 %:"
	$(VENV)/coverage report
	timeout --signal=INT --kill-after=60 1500 ./scripts/in-netns $(VENV)/python -m pytest -q -p no:cacheprovider --durations=25 --ignore=tests/unit -m "not media_matrix and not scaleout" $(PYTEST_ARGS)

# Real media between Chromium and Python call clients, mesh and SFU (a few minutes).
test-media: bootstrap
	timeout --signal=INT --kill-after=60 1200 ./scripts/in-netns $(VENV)/python -m pytest -q -p no:cacheprovider --durations=15 -m media_matrix $(PYTEST_ARGS)

# The browser call client (web/) next to an embedded stack and a Python participant, for people:
# prints the URL and logins, runs until Ctrl-C. Not in the private namespace: a browser must reach it.
web: bootstrap
	$(VENV)/python -m matrixrtc web $(WEB_ARGS)

unit: bootstrap
	$(VENV)/python -m coverage run -m pytest -q tests/unit $(PYTEST_ARGS)
	$(VENV)/coverage report

# The call report on an embedded stack (3-participant E2EE mesh, in the private namespace);
# then, when run from a terminal, the browser client next to a fresh stack with a Python
# participant in a call: URL and logins printed, served for DEMO_WEB_SECONDS (600) or until
# Ctrl-C. Not from a terminal (CI, scripts) or DEMO_WEB_SECONDS=0: the report only.
demo: bootstrap
	./scripts/in-netns $(VENV)/python -m matrixrtc demo
	@secs="$${DEMO_WEB_SECONDS:-$$(if [ -t 0 ]; then echo 600; else echo 0; fi)}"; \
	if [ "$$secs" = 0 ]; then \
	  echo "web client not served (not a terminal, or DEMO_WEB_SECONDS=0): make web serves it"; \
	else \
	  echo; echo "the web call client, for $$secs s (Ctrl-C stops it):"; \
	  $(VENV)/python -m matrixrtc web --for "$$secs" $(WEB_ARGS); \
	fi

# The service image (Dockerfile): wheels fetched first, so the build needs no network.
image:
	./scripts/wheelhouse
	docker build -t matrixrtc/sfu:0.1.0 .

# The matrix-js-sdk interop matrix alone (both dialects x both join orders x plain/encrypted,
# SIGKILL of either side); `make test` runs it too.
.PHONY: interop
interop: bootstrap
	./scripts/in-netns $(VENV)/python -m pytest -q -p no:cacheprovider tests/integration/test_jssdk_interop.py $(PYTEST_ARGS)

# The chaos suite (issue 18): every fault scenario on mesh and on SFU, each participant in its
# own network namespace; prints the table, fails if any invariant is false (bench/chaos.py).
# make test runs its fast subset (tests/integration/test_chaos.py).
.PHONY: chaos
chaos: bootstrap
	timeout --signal=INT --kill-after=60 3600 ./scripts/in-netns $(VENV)/python bench/chaos.py $(CHAOS_ARGS)

# Scale-out, proven (issue 18): two LiveKit nodes over one Redis, two token-service replicas
# (each with a controller) behind one proxy; one node and one replica SIGKILLed mid-call
# (tests/integration/test_scaleout.py; docs/operators.md "Scaling out"). About a minute.
.PHONY: scaleout
scaleout: bootstrap
	timeout --signal=INT --kill-after=30 240 ./scripts/in-netns $(VENV)/python -m pytest -q -s -p no:cacheprovider tests/integration/test_scaleout.py $(PYTEST_ARGS)

# The SFU controller's figures (ghost removal per cause, failover) and the 10-minute soak of
# honest members through Synapse, service and controller restarts (0 false kicks expected).
.PHONY: soak-controller
soak-controller: bootstrap
	./scripts/in-netns $(VENV)/python bench/controller.py --soak-seconds 600

# compose.yaml end to end (CI runs it after `make test`): local stand-in images, dockerd inside
# a private network namespace, `sfu doctor` and a TURN allocation against the stack, a real
# encrypted call through Caddy, a token-service restart mid-call, then `down -v`
# (tests/compose/run.py). Cached under ~/.cache/matrixrtc/compose; ~2-3 min cold, ~1.5 min warm.
# Needs root; never skips: a missing prerequisite fails. On the timeout's SIGTERM the test
# takes the stack down and stops dockerd; whatever is left in its namespace is then killed.
.PHONY: compose-test
compose-test: bootstrap
	timeout --signal=TERM --kill-after=90 900 $(VENV)/python -m tests.compose.run $(COMPOSE_TEST_ARGS)

# The token service under hostile load for 60 s (issue 18): 1 000 connections of forged and
# expired OpenID tokens, SSRF names, oversized, malformed and slow requests next to valid ones;
# fails when an invariant does (make test runs a 6 s version).
.PHONY: hostile
hostile: bootstrap
	./scripts/in-netns $(VENV)/python bench/hostile.py $(HOSTILE_ARGS)

# Issue 19's Go SDK anchor for bench/scale.py (server-sdk-go v2.19.0, pinned in
# bench/goanchor/go.mod/go.sum), built from the Go module proxy into the shared cache; the
# bench finds it through .cache/goanchor.
.PHONY: goanchor
GOANCHOR_BIN := $(HOME)/.cache/matrixrtc/goanchor-$(shell cat bench/goanchor/go.sum bench/goanchor/main.go 2>/dev/null | sha256sum | cut -c1-12)/goanchor
goanchor: $(GOANCHOR_BIN)
	mkdir -p .cache && ln -sfn $(GOANCHOR_BIN) .cache/goanchor
$(GOANCHOR_BIN): bench/goanchor/go.mod bench/goanchor/go.sum bench/goanchor/main.go
	cd bench/goanchor && PATH="$$PATH:/usr/local/go/bin" GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -o $@.tmp . && mv $@.tmp $@
