# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export VBON_PROFILE ?= cpu
PYTEST_ARGS ?=
BENCH_ARGS ?=
EVAL_ARGS ?=
PARETO_ARGS ?=
VLLM_BENCH_ARGS ?=

.PHONY: install model serve test test-fast lint train pareto bench bench-gateway bench-adaptive bench-vllm eval clean help \
	docker-image \
	docker-test reliability

help:
	@echo "make serve   install, prepare the embedded model, start the gateway on :8000"
	@echo "make test    install, prepare the embedded model, run ruff and the test suite"
	@echo "make train   train a vBoN-8 adapter on the defaults (python -m trainer --help)"
	@echo "make pareto  reward vs KL: base, BoN-N, the shipped vBoN-N, KL-RL, BoN-SFT (docs/results)"
	@echo "make bench-gateway   gateway overhead, engine configuration, LoRA cost (docs/results/gateway)"
	@echo "make bench-adaptive   adaptive BoN (early exit, pruning) vs BoN-1..32 (docs/results/adaptive)"
	@echo "make reliability   fuzz, load and fault checks with a summary table"
	@echo "make bench-vllm    vLLM's bench client vs a running gateway: base, vBoN-8, BoN-8 (docs/results/vllm_bench)"

install:
	@bash scripts/install.sh

model: install
	@$(PY) -m vbon.models prepare

serve: model
	$(PY) -m server

lint: install
	$(VENV)/bin/ruff check .

test: model lint
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not engine and not reliability" $(PYTEST_ARGS)

# Fuzz (300 examples per route on the fake engine, 300 requests on the real one), load above
# capacity with RSS, faults (serving and trainer); writes the summary table (with the machine)
# to docs/results/reliability/summary.md. About 7 minutes here.
reliability: model
	VBON_FUZZ_EXAMPLES=$${VBON_FUZZ_EXAMPLES:-300} VBON_FUZZ_ENGINE_EXAMPLES=$${VBON_FUZZ_ENGINE_EXAMPLES:-300} \
		VBON_RELIABILITY_DIR=$${VBON_RELIABILITY_DIR:-docs/results/reliability} \
		VBON_RELIABILITY_COMMAND="make reliability" \
		$(PY) -m pytest -q -m "" tests/reliability tests/test_fuzz_engine.py \
		tests/test_trainer_job.py::test_kill_and_resume $(PYTEST_ARGS)

train: model
	$(PY) -m trainer --n 8

# The paper's comparison on the 200 held-out prompts, 3 evaluation seeds pooled; trains the
# baselines that runs/pareto/adapters lacks (~50 min here), then evaluates (~30 min).
pareto: model
	$(PY) -m trainer.pareto $(PARETO_ARGS)

bench: model
	$(PY) -m clients.bench $(BENCH_ARGS)

# Gateway overhead vs vLLM's AsyncLLM called directly, engine configuration, LoRA cost
# (docs/results/gateway; about 15 minutes here).
bench-gateway: model
	$(PY) scripts/bench_gateway.py $(BENCH_ARGS)

bench-adaptive: model
	$(PY) -m clients.adaptive_bench $(BENCH_ARGS)

# vLLM's own load generator against the gateway that `make serve` runs (VBON_URL, VBON_API_KEY).
bench-vllm: install
	$(PY) -m clients.vllm_bench $(VLLM_BENCH_ARGS)

eval: model
	$(PY) -m clients.eval $(EVAL_ARGS)

docker-image:
	docker/build.sh cpu vbon:cpu

# Builds the CPU image, runs it with the model volume, waits for health, one BoN + one vBoN.
docker-test: model
	docker/smoke-test.sh

clean:
	rm -rf $(VENV) models
