# The two commands of the README. Each creates or reuses .venv by itself (scripts/setup-env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test env

env:
	@bash scripts/setup-env.sh $(VENV)

# The main job: RPO preference training through `deepspeed rpo_fast/train.py --ds_config ...`.
demo: env
	@bash scripts/demo.sh $(PY)

# Lint, the test suite, and the benchmark suite in its quick CPU mode.
test: env
	$(PY) -m ruff check .
	$(PY) -m pytest tests --durations=20
	$(PY) -m pytest benchmarks --benchmark -q
