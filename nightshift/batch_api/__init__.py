"""The self-hosted OpenAI Batch API (`nightshift serve`).

server.py         the entry point: the app, its keys, its runner
routes.py         the HTTP surface (/v1/files, /v1/batches) over the store
store.py          files and batches, and where they live
lifecycle.py      validating → in_progress → finalizing → completed (or failed, expired, cancelled)
runs.py           the ways a batch runs, behind one small interface
local_process.py  a batch as a `nightshift run` process on this machine
deployment.py     a batch as a flow run of a Prefect deployment
"""
