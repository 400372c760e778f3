# make demo: train the digits example; make test: the whole suite, once per
# Keras backend, in separate processes. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= tensorflow jax torch
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install demo test lint bench

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "Installing keras-earlyexit with all backends into $(VENV) (first run only: a few minutes, 3.7 GB)..."
	$(PY) -m pip install --quiet --editable ".[dev]" --constraint constraints.txt
	touch $@

install: $(VENV)/.installed

demo: install
	KERAS_BACKEND=$${KERAS_BACKEND:-tensorflow} $(PY) examples/train_digits.py

test: install
	@for backend in $(BACKENDS); do \
	  echo "== KERAS_BACKEND=$$backend"; \
	  KERAS_BACKEND=$$backend $(PY) -m pytest -q -rs -p no:cacheprovider || exit 1; \
	done

lint: install
	$(VENV)/bin/ruff check keras_earlyexit tests examples benchmarks
	$(VENV)/bin/ruff format --check keras_earlyexit tests examples benchmarks

bench: install
	$(PY) benchmarks/train_step.py
