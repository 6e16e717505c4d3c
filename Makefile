# `make demo` and `make test` each create .venv when it is missing, install the project, then run.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# A CPU build of torch lies on these machines' disk; installing it first keeps pip from pulling a CUDA build.
TORCH   ?= torch==2.13.0
# The Triton kernels are tested on CPU through Triton's interpreter; 3.6 is the version they are checked
# with (and the one the GPU image ships). Triton 3.9's interpreter rejects some masks that compile fine.
TRITON  ?= triton==3.6.0

.PHONY: demo test test-all lint clean install

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	[ "$$(uname -s)" != Linux ] || $(VPY) -c "import triton" 2>/dev/null || $(VPY) -m pip install -q "$(TRITON)"
	$(VPY) -m pip install -q -e ".[dev,peft,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zoo train configs/attention.yaml configs/tasks/mqar.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(VPY) -m pytest -x -q -p no:cacheprovider tests

test-all: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
