"""Specification of which GPUs a worker's telemetry samples: the ones `CUDA_VISIBLE_DEVICES` gives
its engine, read as CUDA reads it. NVML is not on this machine, so a host of four GPUs is played
by an object answering NVML's enumeration calls; bench/gpu_telemetry_check.py runs the same
function against a real GPU's NVML."""

import pytest

from nightshift.observe.telemetry import visible_gpus

pytestmark = pytest.mark.fast

UUIDS = [f"GPU-{n}a1b2c3-0000-1111-2222-33334444555{n}" for n in range(4)]


class FourGpuHost:
    def nvmlDeviceGetCount(self):
        return len(UUIDS)

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetUUID(self, handle):
        return UUIDS[int(handle.removeprefix("gpu"))].encode()

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid.startswith("MIG-"):
            return f"mig:{uuid}"
        return f"gpu{UUIDS.index(uuid)}"


@pytest.mark.parametrize(
    "cuda_visible_devices, sampled",
    [
        (None, ["gpu0", "gpu1", "gpu2", "gpu3"]),  # unset: every GPU of the host
        ("2", ["gpu2"]),  # one worker per GPU: its own, not the host's average
        ("3,1", ["gpu3", "gpu1"]),
        (" 1 , 2 ", ["gpu1", "gpu2"]),
        ("", []),  # no GPU at all
        ("1,7,2", ["gpu1"]),  # CUDA ignores the list from the first entry that names no device
        ("1,-1,2", ["gpu1"]),
        (UUIDS[2], ["gpu2"]),
        ("GPU-3a1b", ["gpu3"]),  # a unique prefix of a UUID, as CUDA accepts
        ("3a1b", ["gpu3"]),
        ("GPU-,1", []),  # a prefix every GPU shares names none of them
        ("MIG-4f6c2d1e-aaaa-bbbb-cccc-ddddeeeeffff", ["mig:MIG-4f6c2d1e-aaaa-bbbb-cccc-ddddeeeeffff"]),
    ],
)
def test_the_sampled_gpus_are_the_ones_cuda_visible_devices_gives_the_engine(cuda_visible_devices, sampled):
    assert visible_gpus(FourGpuHost(), cuda_visible_devices) == sampled
