# Thin verbs; everything a fresh Debian machine with python3 needs is set up here.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# `make run` needs the runtime and the local broker only; the test and check tools (and the
# deploy validators, most of the venv's size) come with `make setup`, which test and check use.
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test check bench faults fuzz setup promtool clean schemas wrk

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local]'
	touch $(RUN_STAMP)

# Debian's prometheus package gives promtool and the server used by the monitoring checks.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }; }
	@# the package starts a system server we do not want; tests start their own
	@-systemctl stop prometheus >/dev/null 2>&1 || true

run: $(RUN_STAMP)
	$(BIN)/python -m devtools.devrun

test: setup promtool
	$(BIN)/pytest -q -p no:cacheprovider

check: setup
	$(BIN)/ruff check service schemas devtools tests bench faults fuzz
	$(BIN)/ruff format --check service schemas devtools tests bench faults fuzz
	$(BIN)/mypy

schemas: setup
	$(BIN)/python -m schemas.generate

# wrk (Debian) is the ingest benchmark's load generator: a separate C process, never the bottleneck.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends wrk >/dev/null 2>&1 || \
	  { apt-get update >/dev/null && apt-get install -y --no-install-recommends wrk >/dev/null; }; }

bench: setup wrk
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.mixed
	$(BIN)/python -m bench.consume
	$(BIN)/python -m bench.recover

faults: setup
	$(BIN)/pytest -q -p no:cacheprovider faults

# Hostile input against a running serve: schemathesis, then FUZZ_REQUESTS (100000) mutated
# requests; exits non-zero on any 5xx, broken connection, RSS growth >= 64 MiB or invalid event.
fuzz: setup
	$(BIN)/python -m fuzz

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
