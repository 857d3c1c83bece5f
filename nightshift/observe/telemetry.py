"""GPU telemetry: pynvml (nvidia-ml-py) sampled by a background thread, about once a second.

On a host without NVML (no NVIDIA driver, as on a CPU machine) the sampler records nothing
and says why; every GPU figure is then null — never a made-up number.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time


class GpuSampler:
    """Samples utilization (%), memory used (MiB) and power (W) of every visible GPU."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: list[dict] = []  # {"t": unix time, "util": %, "mem_mib": MiB, "power_w": W}
        self.gpu_name: str | None = None
        self.gpu_count = 0
        self.unavailable_reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = visible_gpus(pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
            self.gpu_count = len(self._handles)
            if self._handles:
                name = pynvml.nvmlDeviceGetName(self._handles[0])
                self.gpu_name = name.decode() if isinstance(name, bytes) else name
            else:
                self.unavailable_reason = "NVML found no GPU visible to this process"
        except Exception as exc:  # no driver, no library, no permission
            self._nvml = None
            self.unavailable_reason = f"no NVML on this host ({type(exc).__name__})"

    def __enter__(self) -> GpuSampler:
        if self._handles:
            self._thread = threading.Thread(target=self._run, name="nightshift-gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            util = mem = power = 0.0
            for handle in self._handles:
                util += _read(lambda handle=handle: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)  # NaN on MIG
                mem += _read(lambda handle=handle: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
                power += _read(lambda handle=handle: nvml.nvmlDeviceGetPowerUsage(handle) / 1000)
            n = len(self._handles)
            self.samples.append({"t": time.time(), "util": util / n, "mem_mib": mem, "power_w": power})
            self._stop.wait(self.interval_s)

    def summary(self) -> dict:
        """Host and GPU facts plus mean / p50 / p95 of each sampled series (null without NVML)."""
        out = {
            "host": socket.gethostname(),
            # which of the host's GPUs the engine had: engines on one host bill separately
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_name": self.gpu_name,
            "gpu_count": self.gpu_count,
            "gpu_telemetry": "pynvml" if self.samples else (self.unavailable_reason or "no samples"),
            "gpu_samples": self.samples,
        }
        for field in ("util", "mem_mib", "power_w"):
            values = [s[field] for s in self.samples if s[field] == s[field]]  # drop NaN
            out[f"gpu_{field}_mean"] = statistics.fmean(values) if values else None
            out[f"gpu_{field}_p50"] = _percentile(values, 50)
            out[f"gpu_{field}_p95"] = _percentile(values, 95)
        return out


def visible_gpus(nvml, cuda_visible_devices: str | None) -> list:
    """NVML handles of the GPUs this process's engine has, read from `CUDA_VISIBLE_DEVICES` as
    CUDA reads it: indices, GPU UUIDs or their unique prefixes, or whole MIG UUIDs,
    comma-separated, the list ending at the first entry that names no device; unset means every
    GPU. Two workers on one 8-GPU host each report their own GPU, not the host's average."""
    count = nvml.nvmlDeviceGetCount()
    if cuda_visible_devices is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    # NVML numbers GPUs in PCI bus order, as CUDA does on hosts of one GPU model (vLLM maps
    # indices the same way).
    handles = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry:
            break
        if entry.isdigit():
            if int(entry) >= count:
                break
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            continue
        try:
            handles.append(nvml.nvmlDeviceGetHandleByUUID(_full_uuid(nvml, entry, count)))
        except Exception:
            break
    return handles


def _full_uuid(nvml, prefix: str, count: int) -> str:
    """The UUID that `prefix` abbreviates (CUDA accepts any unique prefix; NVML wants it whole)."""
    if prefix.startswith("MIG-"):
        return prefix
    matches = []
    for i in range(count):
        uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        if uuid.startswith(prefix if prefix.startswith("GPU-") else f"GPU-{prefix}"):
            matches.append(uuid)
    if len(matches) != 1:
        raise LookupError(f"{prefix!r} names {len(matches)} GPUs")
    return matches[0]


def _read(measure) -> float:
    try:
        return float(measure())
    except Exception:  # not supported on this device (power on some boards, utilization on MIG)
        return float("nan")


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]
