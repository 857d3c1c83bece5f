#!/usr/bin/env bash
# Work pools, block types, the deployments and the automations on the Prefect server at $PREFECT_API_URL.
# Run from anywhere; flow runs will start in this checkout (NIGHTSHIFT_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=.venv/bin/prefect
$PREFECT work-pool create nightshift-cpu --type process --overwrite
$PREFECT work-pool create nightshift-gpu --type process --overwrite
$PREFECT block register -m nightshift.blocks
$PREFECT block register -m prefect_aws  # S3Bucket, AwsCredentials: what the storage parameter also takes
NIGHTSHIFT_HOME="$PWD" $PREFECT --no-prompt deploy --all --prefect-file deployments/prefect.yaml
# Automations (deployments/automations.yaml): the zombie-run one always; the notifications on a
# failed validation or run when NIGHTSHIFT_NOTIFY_BLOCK names a notification block (TYPE/NAME).
.venv/bin/nightshift automations apply ${NIGHTSHIFT_NOTIFY_BLOCK:+--notify "$NIGHTSHIFT_NOTIFY_BLOCK"}
