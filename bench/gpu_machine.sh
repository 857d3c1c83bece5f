#!/usr/bin/env bash
# bench/bench_gpu.py on the offline GPU machine (../shared/gpu/README.md): vLLM's site from the
# parts already copied to /tmp/p (one `device run` per part, carrying .gpu0 … .gpu4), Nightshift
# from this tree (its flows/, tasks/ and blocks/ placed under nightshift/ as an install would),
# SmolLM2's tokenizer from .gpu-tok (carried). Figures and logs go to $OUT (8 files at most).
#   bash bench/gpu_machine.sh [bench_gpu.py options]
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/s /tmp/shim/nightshift "$OUT"
[ -d /tmp/s/site ] || (cat /tmp/p/part.0* | xz -d -T16 | tar x -C /tmp/s) || exit 1
cp -r "$REPO/nightshift/." /tmp/shim/nightshift/
for d in flows tasks blocks; do rm -rf "/tmp/shim/nightshift/$d"; cp -r "$REPO/$d" "/tmp/shim/nightshift/$d"; done
export PYTHONPATH=/tmp/shim:/tmp/s/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd /tmp || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import vllm, torch, prefect; print('vllm', vllm.__version__, 'torch', torch.__version__, 'prefect', prefect.__version__)"
python3 "$REPO/bench/bench_gpu.py" --tokenizer "$REPO/.gpu-tok" --work /tmp/bench --json "$OUT/bench_gpu.json" "$@" \
  2>&1 | tee "$OUT/bench_gpu.log"
for f in nightshift.log llm_chat.log run_batch.log nightshift-graphs.log; do
  [ -f "/tmp/bench/$f" ] && tail -c 2000000 "/tmp/bench/$f" > "$OUT/$f"
done
[ -f /tmp/bench/nightshift/report.json ] && cp /tmp/bench/nightshift/report.json "$OUT/report.json"
[ -f /tmp/bench/nightshift/validation.json ] && cp /tmp/bench/nightshift/validation.json "$OUT/validation.json"
exit 0
