.PHONY: setup demo test bench deploy

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/nightshift demo

test: setup
	.venv/bin/python -m pytest tests

bench: setup
	.venv/bin/python bench/bench_generate.py

# Work pools, block types and both deployments on the Prefect server at $PREFECT_API_URL.
deploy: setup
	./scripts/deploy.sh
