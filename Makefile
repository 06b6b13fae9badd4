# Thin aliases for the commands in README.md and .ci/run. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= cpt:$(VERSION)
DEMO_DIR ?= demo-run
CORPUS ?= $(CURDIR)/corpus
BASE ?= $(CURDIR)/base-model
OUT ?= $(CURDIR)/output
NAMESPACE ?= default
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make image: the base image (empty: the Dockerfile's CUDA base) and where torch comes from (pypi: the
# CUDA wheel; wheels: the wheel in docker/wheels/).
BASE_IMAGE ?=
TORCH_SOURCE ?= pypi
# make docker-run: GPUs for --gpus (empty: none), the container's user, extra `docker run` flags.
GPUS ?= all
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_RUN_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test lint image image-test docker-run k8s-apply k8s-logs bench clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/cpt: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

install: $(BIN)/cpt ## create .venv with the pinned dependencies and cpt

demo: $(BIN)/cpt ## run the whole job on the embedded sample corpus and a tiny random base model
	$(BIN)/cpt demo --output $(DEMO_DIR)

test: $(BIN)/cpt ## run the test suite (what CI runs)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(BIN)/cpt ## ruff, hadolint, shellcheck, Kubernetes manifests against k8s 1.33 and the Kubeflow CRDs
	$(BIN)/ruff check cpt tests bench tools
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck entrypoint.sh tools/image_test.sh .ci/run .ci/image
	$(BIN)/python tools/k8s_lint.py k8s

image: ## build the image (CUDA base; BASE_IMAGE=..., TORCH_SOURCE=wheels to change), tagged with the version
	docker build --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION="$$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
	  $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) --build-arg TORCH_SOURCE=$(TORCH_SOURCE) -t $(IMAGE) .

docker-run: ## run the image on one GPU: make docker-run CORPUS=dir BASE=dir OUT=dir [CPT_MAX_STEPS=...]
	mkdir -p "$(OUT)"
	docker run --rm $(if $(GPUS),--gpus $(GPUS)) --shm-size 8g --user "$(DOCKER_USER)" $(DOCKER_RUN_ARGS) \
	  -v "$(CORPUS)":/data/corpus:ro -v "$(BASE)":/models/base:ro -v "$(OUT)":/output \
	  $(foreach var,$(filter-out CPT_CORPUS CPT_BASE_MODEL CPT_OUTPUT,$(filter CPT_%,$(.VARIABLES))),-e $(var)) \
	  $(IMAGE)

image-test: $(BIN)/cpt ## make image, then the demo in it (offline, non-root, read-only inputs) and a bad-input exit 3
	$(MAKE) image
	tools/image_test.sh

k8s-apply: ## apply the single-GPU Job (kustomize) to NAMESPACE
	kubectl apply -n $(NAMESPACE) -k k8s

k8s-logs: ## follow the Job's logs
	kubectl logs -n $(NAMESPACE) -f job/cpt

bench: $(BIN)/cpt ## CPU benchmarks (BENCH_ARGS="--cpt-tree DIR": an older checkout beside); writes bench/out/*.json and docs/benchmarks.md
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean: ## remove the venv, demo run and caches (never your corpus, models or outputs)
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache bench/out
