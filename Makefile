.PHONY: setup demo test test-fast bench deploy

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/nightshift demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest tests

# The fast layer alone: no engine, no Prefect server (well under a minute).
test-fast: setup
	.venv/bin/python -m pytest -m fast tests

bench: setup
	.venv/bin/python bench/bench_generate.py

# Work pools, block types, the deployments and the automations on the Prefect server at $PREFECT_API_URL.
deploy: setup
	./scripts/deploy.sh
