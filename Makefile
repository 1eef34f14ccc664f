# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export VBON_PROFILE ?= cpu
PYTEST_ARGS ?=
BENCH_ARGS ?=
EVAL_ARGS ?=

.PHONY: install model serve test test-fast lint train bench eval clean help docker-image docker-test

help:
	@echo "make serve   install, prepare the embedded model, start the gateway on :8000"
	@echo "make test    install, prepare the embedded model, run ruff and the test suite"
	@echo "make train   train a vBoN-8 adapter on the defaults (python -m trainer --help)"

install:
	@bash scripts/install.sh

model: install
	@$(PY) -m vbon.models prepare

serve: model
	$(PY) -m server

lint: install
	$(VENV)/bin/ruff check .

test: model lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not engine" $(PYTEST_ARGS)

train: model
	$(PY) -m trainer --n 8

bench: model
	$(PY) -m clients.bench $(BENCH_ARGS)

eval: model
	$(PY) -m clients.eval $(EVAL_ARGS)

docker-image:
	docker/build.sh cpu vbon:cpu

# Builds the CPU image, runs it with the model volume, waits for health, one BoN + one vBoN.
docker-test: model
	docker/smoke-test.sh

clean:
	rm -rf $(VENV) models
