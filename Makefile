.PHONY: setup demo test test-fast drills bench deploy

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/nightshift demo

# Test files run side by side, whole (their servers are module- or session-scoped, one set per
# worker): two workers fit a 2-core, 24 GiB machine; NIGHTSHIFT_TEST_WORKERS sets another count.
# Drills (waiting by design) are `make drills`.
TEST_WORKERS ?= $(or $(NIGHTSHIFT_TEST_WORKERS),2)

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest tests -m "not drill" -n $(TEST_WORKERS) --dist loadfile --junitxml=.ci/times.xml

# The fast layer alone: no engine, no Prefect server (well under a minute).
test-fast: setup
	.venv/bin/python -m pytest -m fast tests

# The drills: kills on a flaky bucket, an engine server killed mid-run, a Batch API window that
# runs out, a fleet-budget client killed with slots in hand, a GPU worker lost mid-run — each
# waits by design; the suite keeps a faster test of each part. Nightly-style.
drills: setup
	.venv/bin/python -m pytest tests -m drill

bench: setup
	.venv/bin/python bench/bench_generate.py

# Work pools, block types, the deployments and the automations on the Prefect server at $PREFECT_API_URL.
deploy: setup
	./scripts/deploy.sh
