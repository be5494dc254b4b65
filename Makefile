# The two entry points a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean kotlin-tools

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project description changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

DEMO_OUT := exported/tiny-llava-keep0.12-executorch

# The main job on the embedded tiny model: prune + export to ExecuTorch, then generate from the .pte.
demo: $(STAMP)
	$(PY) -m pruner_core.demo --keep 69
	$(VENV)/bin/pruner-export --model tiny-llava --keep 0.12 --target executorch --out $(DEMO_OUT) --overwrite
	$(VENV)/bin/pruner-run $(DEMO_OUT) --image astronaut --prompt "What is in the picture?" --max-new-tokens 16

test: $(STAMP) kotlin-tools
	$(PY) -m pytest -q tests

# Best effort: Debian's Kotlin compiler, JUnit 4 and Android's org.json let the suite compile and run the Android
# app's Android-free Kotlin and its unit tests (tests/test_android_demo.py skips that test, saying so, without them).
kotlin-tools:
	@command -v kotlinc >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		kotlin junit4 libandroid-json-java >/dev/null; } || echo "kotlin-tools: not installed (no root apt-get)"; }

bench: $(STAMP)
	$(PY) benchmarks/bench_select.py

clean:
	rm -rf $(VENV) build *.egg-info tests/js/node_modules
