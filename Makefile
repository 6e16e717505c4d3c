# `make demo` and `make test` each create .venv when it is missing, install the project, then run.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# A CPU build of torch lies on these machines' disk; installing it first keeps pip from pulling a CUDA build.
TORCH   ?= torch==2.13.0
# Everything else resolves to the newest release pip finds, so an upstream break turns CI red.
# The oldest supported versions (the lower bounds in pyproject.toml) are tested by `make test-compat`.
COMPAT_VENV := .venv-compat
COMPAT_PY   := $(COMPAT_VENV)/bin/python
COMPAT_PINS ?= triton==3.6.0 transformers==5.5.4
# What the compat step runs: generation, cache, packing, fresh loading, every kernel (Triton interpreter), the
# backend setting, bf16 and the tiled loss.
COMPAT_TESTS ?= tests/test_generation.py tests/test_hf_packing.py tests/test_fresh_load.py tests/test_models.py \
	tests/test_hybrid.py tests/test_linear_scan.py tests/test_selective_scan.py tests/test_gla.py \
	tests/test_delta_rule.py tests/test_causal_conv1d.py tests/test_triton_compat.py tests/test_packing.py \
	tests/test_backend.py tests/test_kernel_layout.py tests/test_bf16.py tests/test_long_context.py
PYTEST  := -m pytest -q -p no:cacheprovider -ra --durations=10

.PHONY: demo test test-all test-compat lint clean install versions

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[dev,peft,eval]"
	touch $(STAMP)

install: $(STAMP)

versions: $(STAMP)
	@$(VPY) scripts/versions.py

demo: $(STAMP)
	$(VENV)/bin/zoo train configs/attention.yaml configs/tasks/mqar.yaml --out runs/demo --overwrite

# Every failure is reported (no -x): CI shows the whole damage of an upstream change at once.
test: $(STAMP)
	@$(VPY) scripts/versions.py
	$(VPY) $(PYTEST) tests

test-all: $(STAMP)
	$(VPY) $(PYTEST) -m "" tests

$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	test -x $(COMPAT_PY) || $(PY) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -c "import torch" 2>/dev/null || $(COMPAT_PY) -m pip install -q "$(TORCH)"
	$(COMPAT_PY) -m pip install -q $(COMPAT_PINS)
	$(COMPAT_PY) -m pip install -q -e ".[dev]" $(COMPAT_PINS)
	touch $@

# The same tests on the oldest supported transformers and Triton.
test-compat: $(COMPAT_VENV)/.installed
	@$(COMPAT_PY) scripts/versions.py
	$(COMPAT_PY) $(PYTEST) $(COMPAT_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs .pytest_cache
