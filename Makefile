# epserve — two commands: `make run` and `make test`. Each sets everything up on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` serves the trained demo model committed in checkpoints/ (epserve train);
# models/v3-mini is the random-weight preset (generated on demand) that `make bench` measures.
MODEL_DIR ?= checkpoints/bard-moe
BENCH_MODEL_DIR ?= models/v3-mini

.PHONY: install run test chaos fuzz bench lint protos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first from the pinned range, so a CPU-only machine keeps its CPU wheel.
	$(BIN)/pip install -q "torch>=2.4,<2.14"
	$(BIN)/pip install -q -e ".[test,train]"
	touch $(STAMP)

protos: install
	$(BIN)/python -m services.local.codegen

models/v3-mini/config.json: | install
	$(BIN)/epserve make-model --preset v3-mini --out models/v3-mini

# remade when the presets change (v3-wide went from 3 to 7 layers)
models/v3-wide/config.json: services/model/presets.py | install
	$(BIN)/epserve make-model --preset v3-wide --out models/v3-wide

run: install $(MODEL_DIR)/config.json
	$(BIN)/python -m services.local.demo --model $(MODEL_DIR)

# Everything but the full chaos matrix, plus its quick subset (marker chaos_quick, ~2 min).
test: install
	$(BIN)/ruff check services tests bench
	EPSERVE_FUZZ_EXAMPLES=$${EPSERVE_FUZZ_EXAMPLES:-150} $(BIN)/python -m pytest -q tests -m "not chaos or chaos_quick"

# The whole chaos matrix against one supervised cluster (~15 min; docs/chaos.md); writes
# tests/chaos/last_run.md.
chaos: install
	$(BIN)/python -m pytest -q tests/chaos -m chaos

# Generated bad requests against every API of a running cluster, 1,000 per API (~6 min;
# `make test` runs 150 per API).
fuzz: install
	EPSERVE_FUZZ_EXAMPLES=1000 $(BIN)/python -m pytest -q tests/fuzz

bench: install $(BENCH_MODEL_DIR)/config.json models/v3-wide/config.json
	$(BIN)/python -m bench.run_all --model $(BENCH_MODEL_DIR)

lint: install
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

clean:
	rm -rf $(VENV) models .pytest_cache
