# ParaDiffusion toolkit. `make help` lists the targets.
# Every stage target is a thin wrapper over the CLI: `paradiffusion <stage> --config $(CONFIG)`.
# One-run overrides: make filter SET="filter.thresholds.aesthetic_min=6 ray.address=auto"

VENV    ?= .venv
PY      ?= $(VENV)/bin/python
CONFIG  ?= pipelines.yaml
SET     ?=
PD       = $(PY) -m paradiffusion
ARGS     = --config $(CONFIG) $(foreach s,$(SET),--set $(s))

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-integration lint config

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## create .venv and install everything (torch, ray, deepspeed, ...); no GPU needed
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: deepspeed builds against the torch already installed
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install --quiet -e '.[all,dev]'
	@$(PY) -c "import torch, ray, open_clip, img2dataset, transformers, diffusers, peft, deepspeed, duckdb; print('setup ok: torch', torch.__version__, '| ray', ray.__version__)"

demo: ## run every stage on the bundled sample with tiny offline models (writes demo_out/)
	$(PD) demo --out demo_out

test: ## the default test suite (fast; no cluster, no GPU)
	$(PY) -m pytest -q

test-integration: ## tests that start a real Ray cluster / deepspeed launcher, and slow ones
	$(PY) -m pytest -q -m "slow or cluster"; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

lint: ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

config: ## validate pipelines.yaml and print it resolved
	$(PD) config $(ARGS)
