"""The shard telemetry (nightshift/observe/telemetry.py) against a real GPU's NVML: which GPUs each
`CUDA_VISIBLE_DEVICES` form samples, and whether utilization, memory and power move with load.

Needs an NVIDIA GPU, its driver, torch with CUDA and nvidia-ml-py (not vLLM):

    python bench/gpu_telemetry_check.py

Prints one line per check and a JSON summary; exits 1 if a check fails.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nightshift.observe.telemetry import GpuSampler  # noqa: E402


def sampled_while(seconds: float, busy: bool, devices: str | None) -> dict:
    import torch

    if devices is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    with GpuSampler(interval_s=0.25) as sampler:
        end = time.monotonic() + seconds
        if busy:
            a = torch.randn(8192, 8192, device="cuda:0")
            while time.monotonic() < end:
                (a @ a).sum().item()
        else:
            time.sleep(seconds)
    summary = sampler.summary()
    summary.pop("gpu_samples")
    summary["samples"] = len(sampler.samples)
    return summary


def main() -> int:
    import pynvml
    import torch

    torch.cuda.init()  # CUDA reads CUDA_VISIBLE_DEVICES once; the sampler reads it on each start
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    count = pynvml.nvmlDeviceGetCount()
    print(f"NVML sees {count} GPU(s); GPU 0 is {uuid}")

    results, failures = {}, []

    def check(name: str, ok: bool, detail) -> None:
        results[name] = detail
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {json.dumps(detail)}")
        if not ok:
            failures.append(name)

    idle = sampled_while(3, busy=False, devices="0")
    busy = sampled_while(6, busy=True, devices="0")
    check("busy GPU reads higher utilization than idle", busy["gpu_util_mean"] > idle["gpu_util_mean"] + 30, {
        "idle_util_mean": idle["gpu_util_mean"], "busy_util_mean": busy["gpu_util_mean"],
    })  # fmt: skip
    check("busy GPU draws more power than idle", (busy["gpu_power_w_mean"] or 0) > (idle["gpu_power_w_mean"] or 0), {
        "idle_power_w": idle["gpu_power_w_mean"], "busy_power_w": busy["gpu_power_w_mean"],
    })  # fmt: skip
    reserved_mib = torch.cuda.memory_reserved(0) / 2**20
    check("memory used includes this process's tensors", busy["gpu_mem_mib_p95"] >= reserved_mib, {
        "sampled_mem_mib_p95": busy["gpu_mem_mib_p95"], "torch_reserved_mib": reserved_mib,
    })  # fmt: skip
    for label, devices in (("unset", None), ("index", "0"), ("uuid", uuid), ("uuid prefix", uuid[:12])):
        summary = sampled_while(1, busy=False, devices=devices)
        expected = count if devices is None else 1
        check(f"CUDA_VISIBLE_DEVICES {label} samples {expected} GPU(s)", summary["gpu_count"] == expected, {
            "cuda_visible_devices": devices, "gpu_count": summary["gpu_count"], "gpu_name": summary["gpu_name"],
            "samples": summary["samples"],
        })  # fmt: skip
    for label, devices in (("an absent index", str(count)), ("empty", "")):
        summary = sampled_while(1, busy=False, devices=devices)
        check(f"CUDA_VISIBLE_DEVICES {label} samples nothing and says why", summary["gpu_count"] == 0, {
            "cuda_visible_devices": devices, "gpu_count": summary["gpu_count"], "said": summary["gpu_telemetry"],
        })  # fmt: skip
    print(json.dumps({"gpu": busy["gpu_name"], "failures": failures, "results": results}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
