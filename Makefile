.PHONY: setup demo test bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/nightshift demo

test: setup
	.venv/bin/python -m pytest tests

bench: setup
	.venv/bin/python bench/bench_generate.py
