# The README's two commands: `make quickstart` and `make test`. Both set up the venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On a machine without an NVIDIA GPU take the CPU wheel of torch (an unpinned torch pulls a multi-GB CUDA
# build); with a GPU, pip resolves torch normally and gets CUDA.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup quickstart test test-unit test-gpu test-docs docs down lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install --quiet "$(TORCH_CPU)"; fi
	$(PIP) install --quiet -e '.[dev]'
	touch $@

quickstart: setup
	$(VENV)/bin/mlray quickstart

test: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest

test-unit: setup
	$(VENV)/bin/pytest tests/unit

# On a machine with CUDA: the GPU tests (tests/gpu, and unit tests marked gpu). Skipped without one.
test-gpu: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -m gpu tests/gpu tests/unit

# The README and docs/ as a test: every shell block, run as written from a clean shell against the head that
# `make quickstart` starts (needs ports 8000, 8265 and 5000 free, and no Ray running); also makes the
# pictures of the docs site (docs/img/generated/).
test-docs: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest tests/docs

# The docs site, into site/: the bench plots, then a strict build (a broken link or anchor fails it).
# Pictures of runs that tests/docs has not made yet get a placeholder, unless MLRAY_DOCS_REQUIRE_PICTURES=1.
docs: setup
	$(PY) docs/tools/plot_bench.py
	$(VENV)/bin/mkdocs build --strict

down:
	$(VENV)/bin/mlray down

lint: setup
	$(VENV)/bin/ruff check mlray jobs serve_apps tests
	$(VENV)/bin/mypy mlray

clean: down
	rm -rf .mlray
