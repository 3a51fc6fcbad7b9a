# Entry points for a fresh machine: each target installs what it needs on first use.
# uv comes from PyPI into .tools/ unless it is already on PATH. Commands run from .venv/bin
# directly rather than through `uv run`, whose environment Ray would try to re-create in
# every worker process.
UV ?= $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)

.PHONY: demo test lint format sync

demo: .venv/.synced
	.venv/bin/segpipe demo

test: .venv/.synced
	.venv/bin/pytest

# lint-imports checks the layering contracts in pyproject.toml's [tool.importlinter].
lint: .venv/.synced
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy segpipe
	.venv/bin/lint-imports --no-cache --no-logo

format: .venv/.synced
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

sync: .venv/.synced

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev
	touch $@

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/python -m pip install --quiet uv==0.13.9
