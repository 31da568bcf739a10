# The two commands of the README. Each creates or reuses .venv by itself (scripts/setup-env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test env docs

env:
	@bash scripts/setup-env.sh $(VENV)

# The documentation site, served at http://127.0.0.1:8000 while you edit it.
docs: env
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# The main job: RPO preference training through `deepspeed rpo_fast/train.py --ds_config ...`.
demo: env
	@bash scripts/demo.sh $(PY)

# Lint, the documentation site (strict: a broken link or API reference fails), the test suite, and the benchmark
# suite in its quick CPU mode.
test: env
	$(PY) -m ruff check .
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -q -d site
	$(PY) -m pytest tests --durations=20
	$(PY) -m pytest benchmarks --benchmark -q
