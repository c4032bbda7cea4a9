# Set-up and day-to-day commands. Everything a test needs is installed here, idempotently.
# torch is pinned on purpose: an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH   = torch==2.13.0

# The SGLang releases `make test` runs for real (each has its pinned requirements in
# tests/sglang/); 0.5.12 is supported too: make test SGLANG_RELEASES="0.5.11 0.5.12 0.5.23".
SGLANG_RELEASES ?= 0.5.11 0.5.23

.PHONY: serve test lint format system-deps venv dev clean test-multihost test-kill9 bench bench-smoke bench-profile sglang-envs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The server on its embedded defaults: 127.0.0.1:8998, durable state in ./prefill-bootstrap-state.
serve: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server]'
	$(BIN)/prefill-bootstrap serve

# Everything the test suite needs: system tools, torch (CPU, pinned), the package with all extras.
dev: $(BIN)/python system-deps
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[server,torch,dev]'

system-deps:
	bash scripts/install-system-deps.sh

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole suite: lint, unit, API, real servers, multi-process torch.distributed, multi-host.
test: lint sglang-envs
	TEST_SGLANG_RELEASES="$(SGLANG_RELEASES)" $(BIN)/pytest

# One virtualenv per SGLang release in .cache/sglang-envs/ (CPU torch, real SGLang, this repo
# editable), built side by side the first time (~9 min), then checked against their stamps in
# well under a second.
sglang-envs:
	@pids=""; for release in $(SGLANG_RELEASES); do \
	  bash scripts/sglang-test-env.sh $$release & pids="$$pids $$!"; \
	done; failed=0; for pid in $$pids; do wait $$pid || failed=1; done; exit $$failed

format: $(BIN)/python
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Just the multi-host tests: network namespaces as hosts, torch.distributed across them (root).
test-multihost: dev
	$(BIN)/pytest -m netns -s

# Just the kill -9 suites (issue 17), longer than `make test` runs them: the storms with
# KILL_SEEDS seeds each, the stateful test with STATEFUL_EXAMPLES runs.
KILL_SEEDS ?= 20
STATEFUL_EXAMPLES ?= 50
test-kill9: dev
	TEST_KILL_SEEDS=$(KILL_SEEDS) TEST_STATEFUL_EXAMPLES=$(STATEFUL_EXAMPLES) $(BIN)/pytest -m kill9

# Benchmarks (issue 8): every phase, 3 runs each; the table goes into bench/README.md, the JSON
# into bench/results/ (~6 min).
bench: dev
	$(BIN)/python -m bench --update-readme

# Every phase at toy size in ~10 s: proves the suite works (0 errors), says nothing about speed.
bench-smoke: dev
	$(BIN)/python -m bench --smoke

# Where the server's time goes under GET /route and a 4096-rank storm (py-spy).
bench-profile: dev
	$(BIN)/pip install --quiet py-spy
	$(BIN)/python -m bench.profile
