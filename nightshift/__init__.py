"""Nightshift: self-hosted offline batch LLM inference, orchestrated by Prefect.

One import namespace: `nightshift.flows`, `nightshift.tasks` and `nightshift.blocks` are the
repository's top-level flows/, tasks/ and blocks/ (the design card's layout), mapped into this
package by pyproject's package-dir — by the installed wheel, and by the editable install's
finder for a checkout (`scripts/setup.sh` installs one).
"""

from nightshift.observe.logs import keep_vllm_from_configuring_logging as _keep_vllm_from_configuring_logging

# Before anything imports vLLM, in whatever process imports Nightshift (the CLI, a work-pool
# worker's flow run, `nightshift serve`, a test): vLLM must not reconfigure logging (nightshift/observe/logs.py).
_keep_vllm_from_configuring_logging()
