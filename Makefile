# The two commands of the quickstart:
#   make run    create/refresh .venv, then run the whole pipeline (`dvc repro` inside one MLflow parent
#               run: `desensitize repro`) on the default dataset
#   make test   create/refresh .venv, then check format and lint (ruff) and run the test suite
# Besides them, for the inner loop: make test-fast   the suite without the tests marked slow (end to end)
# The venv is (re)installed whenever pyproject.toml or requirements.lock changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3

.PHONY: run test test-fast install

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: cannot create $(VENV) with '$(PYTHON)'; needs Python 3.11 with venv (Debian: apt-get install python3.11-venv)" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@touch $@

install: $(STAMP)

# The summary prints whether the pipeline went through or the privacy gate blocked the release;
# make still exits with the pipeline's status.
run: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/desensitize repro; status=$$?; \
	  $(BIN)/desensitize summary; exit $$status

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"
