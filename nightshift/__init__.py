"""Nightshift: self-hosted offline batch LLM inference, orchestrated by Prefect.

One import namespace: `nightshift.flows`, `nightshift.tasks` and `nightshift.blocks` are the
repository's top-level flows/, tasks/ and blocks/ (the design card's layout). An installed
package holds them inside (pyproject's package-dir); a source checkout imported from its own
folder (tests, a copied checkout on PYTHONPATH) finds them beside this package, here.
"""

from pathlib import Path as _Path

from nightshift.logs import keep_vllm_from_configuring_logging as _keep_vllm_from_configuring_logging

# Before anything imports vLLM, in whatever process imports Nightshift (the CLI, a work-pool
# worker's flow run, `nightshift serve`, a test): vLLM must not reconfigure logging (nightshift/logs.py).
_keep_vllm_from_configuring_logging()

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "tasks" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__)
