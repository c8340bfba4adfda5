# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build.
TORCH ?= torch==2.13.0

.PHONY: install browser llama demo test test-fast bench bench-search bench-options bench-gguf bench-web clean

$(BIN)/abliterate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/abliterate

demo: install
	$(BIN)/abliterate demo

# llama.cpp (llama-cpp-python) compiles from source: about 10 minutes on 2 cores, cached by pip afterwards.
# It writes K-quant GGUF tensors and runs `verify-gguf`; without it those tests skip and say why.
# LLAVA_BUILD=OFF leaves out the multimodal library (mtmd, about an eighth of the C++), which nothing here loads;
# should that build fail, the package's default build is tried before giving up.
LLAMA_CMAKE ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=OFF
llama: install
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip install --quiet "llama-cpp-python==0.3.36" || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install --quiet "llama-cpp-python==0.3.36" || \
	  echo "llama-cpp-python did not build: the llama.cpp tests will skip"

# Headless Chromium renders the HTML pages in the tests; installed from Debian when we are root.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser tests will skip"

test: install browser llama
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not llama and not browser"

bench: install
	$(BIN)/python benchmarks/bench_pipeline.py

# run --search on the reference model in the setting of issue 3 (Heretic's: trials scored on the evaluation
# prompts, its system prompt), then the option table on its study; about 24 + 12 minutes
bench-search: install
	rm -f /tmp/abliterate-bench-search.study
	$(BIN)/python benchmarks/bench_search.py search_on=eval trials=60 time_budget=900 max_kl=0.0375 \
	  study=/tmp/abliterate-bench-search.study
	$(BIN)/python benchmarks/bench_options.py /tmp/abliterate-bench-search.study --points 3 max_kl=0.0625 \
	  search_on=eval

# each search option with and without it: one 16-trial search per option set, same seeds; about 140 minutes
bench-options: install
	$(BIN)/python benchmarks/bench_option_searches.py --trials 16

bench-gguf: install llama
	$(BIN)/python benchmarks/bench_gguf.py

# export-onnx and the web page on the reference model: sizes, agreement, CPU and in-browser tokens/s
bench-web: install browser
	$(BIN)/python benchmarks/bench_web.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
