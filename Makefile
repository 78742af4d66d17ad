# Set-up and the two entry points: `make demo` (the whole pipeline on the embedded demo data)
# and `make test`. Both create .venv and install into it when missing.
VENV := .venv
BIN := $(VENV)/bin
SHELL := /bin/bash

# Offline hygiene for every command run from here (the stage modules set the same defaults).
export DO_NOT_TRACK := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test test-fast flow serve install

install: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml and installed in the same pip call as monai, so pip
# takes the local CPU wheel instead of resolving a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: install
	dvc repro
	@echo "== metrics of every dataset's ensemble on its held-out demo test set =="
	python -m tasks.summary

flow: install
	python -m flows.pipeline run

# A Prefect server on 127.0.0.1:4200, the `segpipe` work pool and segpipe's deployments, until
# Ctrl-C (flows/server.py). Options of `segpipe serve` go in ARGS, e.g. ARGS=--on-workers.
serve: install
	python -m flows.server -- $(ARGS)

test: install
	python -m pytest

# The edit loop: every test but the end-to-end ones marked `slow` (`make test` and CI run all).
test-fast: install
	python -m pytest -m "not slow"
