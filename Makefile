# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build.
TORCH ?= torch==2.13.0

.PHONY: install browser demo test test-fast bench clean

$(BIN)/abliterate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/abliterate

demo: install
	$(BIN)/abliterate demo

# Headless Chromium renders the HTML pages in the tests; installed from Debian when we are root.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser tests will skip"

test: install browser
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
