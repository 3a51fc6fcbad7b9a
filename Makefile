# Entry points for a fresh machine: each target installs what it needs on first use.
# uv comes from PyPI into .tools/ unless it is already on PATH.
UV ?= $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)

.PHONY: demo test lint format sync

demo: .venv/.synced
	$(UV) run --locked --no-sync segpipe demo

test: .venv/.synced
	$(UV) run --locked --no-sync pytest

lint: .venv/.synced
	$(UV) run --locked --no-sync ruff check .
	$(UV) run --locked --no-sync ruff format --check .
	$(UV) run --locked --no-sync mypy segpipe

format: .venv/.synced
	$(UV) run --locked --no-sync ruff format .
	$(UV) run --locked --no-sync ruff check --fix .

sync: .venv/.synced

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev
	touch $@

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/python -m pip install --quiet uv==0.13.9
