# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, from the exact pin (a local CPU wheel); everything else pinned by constraints.txt.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[openvino,coreml,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffprism export tiny-sd --out $(DEMO_OUT)
	$(BIN)/diffprism validate $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(DEMO_OUT) bench-out
