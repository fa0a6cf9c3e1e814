# The two commands a newcomer needs: `make simulate` and `make test`; `make test-all` runs every
# test and `make docs` builds the documentation site (CI: .ci/run runs make test-all and make docs).
# All create/update .venv idempotently (re-installing only when pyproject.toml changes).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup simulate test test-all docs bench clean-runs

setup: $(STAMP) $(DATA)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch/torchvision go first and pinned, with pip (a CPU build from the local index).
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

$(DATA):
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

simulate: setup
	$(PY) -m simulations.run

# The fast subset a developer runs all day: everything not marked `slow` (pretrained ViT,
# Flower end to end, or longer than a few seconds), with the slowest tests listed.
test: setup
	$(PY) -m pytest -m "not slow" --durations=15

test-all: setup
	$(PY) -m pytest --durations=25

# The docs group is installed on first use only, so `make test` stays as fast as before.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: setup
	$(PY) -m benchmarks.speed
	$(PY) -m benchmarks.ledger
