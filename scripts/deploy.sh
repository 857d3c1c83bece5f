#!/usr/bin/env bash
# Work pools, block types and the deployments on the Prefect server at $PREFECT_API_URL.
# Run from anywhere; flow runs will start in this checkout (NIGHTSHIFT_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=.venv/bin/prefect
$PREFECT work-pool create nightshift-cpu --type process --overwrite
$PREFECT work-pool create nightshift-gpu --type process --overwrite
$PREFECT block register -m nightshift.blocks
NIGHTSHIFT_HOME="$PWD" $PREFECT --no-prompt deploy --all --prefect-file deployments/prefect.yaml
