# The two entry points a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_select.py

clean:
	rm -rf $(VENV) build *.egg-info
