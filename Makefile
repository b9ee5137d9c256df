# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: setup demo test bench clean optimum-venvs optimum-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, from the exact pin (a local CPU wheel); everything else pinned by constraints.txt.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[openvino,coreml,aotinductor,lora,test]"
	touch $(STAMP)

setup: $(STAMP)

# The demo draws with tiny-shapes (trained, shipped with the package) so that the report shows pictures.
DEMO_PROMPTS := --e2e-prompt "a yellow circle on a blue background, bottom right" \
	--e2e-prompt "a white triangle on a red background, bottom left" \
	--e2e-prompt "a blue square on a green background, center"
DEMO_E2E := --e2e --e2e-steps 12 $(DEMO_PROMPTS)

demo: $(STAMP)
	$(BIN)/diffprism export tiny-shapes --out $(DEMO_OUT)
	$(BIN)/diffprism validate $(DEMO_OUT) $(DEMO_E2E)
	$(BIN)/diffprism compile $(DEMO_OUT) --target openvino --precision fp32
	$(BIN)/diffprism validate $(DEMO_OUT) --target openvino --precision fp32 $(DEMO_E2E)
	$(BIN)/diffprism calibrate $(DEMO_OUT) --prompts examples/tiny-shapes-prompts.txt --steps 12
	$(BIN)/diffprism compile $(DEMO_OUT) --target openvino --precision int8
	$(BIN)/diffprism validate $(DEMO_OUT) --target openvino --precision int8 $(DEMO_E2E)
	$(BIN)/diffprism bench $(DEMO_OUT) --steps 12 --repeat 5 --image-runs 1
	$(BIN)/diffprism -q report $(DEMO_OUT)
	@echo "report: $(abspath $(DEMO_OUT))/report/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

# optimum in its own venvs (it pins older transformers/diffusers than diffprism), from exact pins:
# torch first, then the frozen set without dependency resolution (see benchmarks/optimum-*.txt).
OPTIMUM_VENVS ?= $(HOME)/.cache/diffprism/venvs
OPTIMUM_OUT ?= optimum-out

$(OPTIMUM_VENVS)/%/.installed: benchmarks/%.txt
	$(PY) -m venv $(OPTIMUM_VENVS)/$*
	$(OPTIMUM_VENVS)/$*/bin/pip install --quiet torch==2.13.0
	$(OPTIMUM_VENVS)/$*/bin/pip install --quiet --no-deps -r $<
	touch $@

optimum-venvs: $(OPTIMUM_VENVS)/optimum-onnx/.installed $(OPTIMUM_VENVS)/optimum-intel/.installed

# tiny-sd, tiny-sdxl and tiny-lcm exported and compiled for OpenVINO, then loaded in optimum's ORT and OV pipelines.
optimum-check: $(STAMP) optimum-venvs
	for p in tiny-sd tiny-sdxl tiny-lcm; do \
	  $(BIN)/diffprism -q export $$p --out $(OPTIMUM_OUT)/$$p && \
	  $(BIN)/diffprism -q compile $(OPTIMUM_OUT)/$$p --target openvino --precision fp32 || exit 1; \
	done
	DIFFPRISM_VENVS=$(OPTIMUM_VENVS) $(BIN)/python benchmarks/optimum_loaders.py $(OPTIMUM_OUT)/tiny-sd $(OPTIMUM_OUT)/tiny-sdxl $(OPTIMUM_OUT)/tiny-lcm \
	  --json $(OPTIMUM_OUT)/loaders.json

clean:
	rm -rf $(DEMO_OUT) bench-out $(OPTIMUM_OUT)
