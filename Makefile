# Two commands for a newcomer: `make serve` and `make test`. Both install into .venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build of PyTorch for development and tests; the service itself never needs torch.
TORCH  := torch==2.13.0
HOST   ?= 0.0.0.0
PORT   ?= 8000

.PHONY: serve test test-slow test-all lint install install-dev clean container-test bench lint-deploy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Service dependencies only.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Everything: service, training (CPU torch), scale-out (Ray) and test tools.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[train,dev,scale]" "$(TORCH)"
	touch $@ $(VENV)/.installed-serve

# Debian's chromium for the browser test (root or sudo); without it those tests skip and say why.
$(VENV)/.installed-browser: scripts/install-browser.sh | $(VENV)/.installed-dev
	bash scripts/install-browser.sh && touch $@ || echo "make: chromium not installed; the browser tests will skip"

install: $(VENV)/.installed-serve
install-dev: $(VENV)/.installed-dev

# Settings come from WBC_* variables (README); SIGTERM drains requests in flight, then exits 0.
serve: $(VENV)/.installed-serve
	$(BIN)/python -m app --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev $(VENV)/.installed-browser
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# The heavier reliability checks (schemathesis at full depth, dropped uploads, load script smoke); CI runs them.
test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev lint-deploy
	$(BIN)/ruff check app model_training tests benchmarks deploy
	$(BIN)/mypy app

# The Dockerfile against hadolint, docker-compose.yml against the Compose specification.
lint-deploy: $(VENV)/.installed-dev
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

# Builds both image flavours on a local Debian base with buildah and proves they serve (root; 5-7 min).
container-test:
	bash scripts/container-smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
