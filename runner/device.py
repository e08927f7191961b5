"""What this process holds on the GPU, as the driver counts it.

MLX's counters (active and cached bytes) see only MLX's own buffers. On a
CUDA host a process also holds a CUDA context and its libraries' workspaces
(500-650 MiB on an H200, before any model), which only the driver knows:
NVML reports each process's device memory, all of it. On a Mac (unified
memory) and on a host without an NVIDIA driver there is no such figure.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def _nvml_ready() -> bool:
    """Whether NVML is there and started (once per process)."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    return True


def held_bytes() -> int | None:
    """The device memory this process holds on every GPU together, or None
    where the driver does not say (no NVIDIA driver, or a process not found
    in its list: a PID namespace of its own)."""
    if not _nvml_ready():
        return None
    import pynvml

    pid, total, found = os.getpid(), 0, False
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total, found = total + int(proc.usedGpuMemory), True
    except pynvml.NVMLError:
        return None
    return total if found else None
