"""Device profiles for the planner: memory, the accelerator's usable share of it, peak
16-bit throughput and memory bandwidth.

Apple GPUs: Metal lets one process wire at most ``recommendedMaxWorkingSetSize`` of the
unified memory. macOS sets it to about two thirds of RAM on machines with up to 36 GB and
three quarters above (so ~36 GB of a 48 GB Mac); it can be raised until the next reboot
with ``sudo sysctl iogpu.wired_limit_mb=N`` (macOS 14+; ``debug.iogpu.wired_limit`` on
13), at the risk of starving the OS. MLX reports the current value as
``mx.metal.device_info()["max_recommended_working_set_size"]`` (``this`` reads it).

Peak throughput of Apple GPUs is not published by Apple; the figures below are the
widely quoted FP32 peaks (ALUs x 2 x clock; Apple GPUs run FP16/BF16 at the FP32 rate),
memory bandwidth is Apple's own figure:

    m4       10-core GPU ~4.3 TFLOPS; 120 GB/s   (apple.com/newsroom 2024-05 "Apple introduces M4 chip")
    m4-pro   20-core GPU ~8.5 TFLOPS; 273 GB/s   (apple.com/newsroom 2024-10 "Apple introduces M4 Pro and M4 Max")
    m4-max   40-core GPU ~17 TFLOPS;  546 GB/s   (same)
    m3-max   40-core GPU ~16 TFLOPS;  400 GB/s   (apple.com/newsroom 2023-10 "Apple unveils M3, M3 Pro, and M3 Max")
    h100     SXM5, dense BF16 989 TFLOPS; HBM3 3.35 TB/s, 80 GB (NVIDIA H100 Tensor Core GPU datasheet)

A base M4 ships with at most 32 GB; 48 GB means an M4 Pro or M4 Max (``--memory-gb``
overrides the profile's RAM, and the Metal limit follows it). Time estimates use a
sustained fraction of the peak (``SUSTAINED``): training kernels in MLX reach well
below peak -- a stated assumption, not a measurement; ``this`` measures instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

GiB = 2**30
SUSTAINED = 0.35  # assumed sustained fraction of the peak for a LoRA training step


@dataclass(frozen=True)
class Device:
    """A machine the planner plans for. ``memory_gb`` is the RAM (GiB) and
    ``limit_gb`` what one process's accelerator may use of it."""

    name: str
    backend: str  # metal | cuda | cpu
    memory_gb: float
    peak_tflops: float  # 16-bit (fp32 on the CPU), dense
    bandwidth_gbs: float
    disk_gbs: float  # sequential read/write of the local SSD, for checkpoint offload
    sustained: float = SUSTAINED
    limit_gb: float | None = None  # None: derived from memory_gb by the backend's rule
    source: str = ""

    @property
    def budget_gb(self) -> float:
        if self.limit_gb is not None:
            return self.limit_gb
        return metal_limit_gb(self.memory_gb) if self.backend == "metal" else self.memory_gb

    @property
    def gflops(self) -> float:
        """Sustained training throughput assumed for the time estimate (GFLOP/s)."""
        return self.peak_tflops * 1e3 * self.sustained

    def with_memory(self, memory_gb: float | None) -> Device:
        if memory_gb is None:
            return self
        if memory_gb <= 0:
            raise ConfigError(f"--memory-gb must be positive, got {memory_gb}")
        limit = None if self.limit_gb is None else min(self.limit_gb, memory_gb)
        return Device(self.name, self.backend, memory_gb, self.peak_tflops, self.bandwidth_gbs, self.disk_gbs,
                      self.sustained, limit, self.source)


def metal_limit_gb(memory_gb: float) -> float:
    """macOS's default Metal working-set limit for ``memory_gb`` of unified memory."""
    return memory_gb * (0.75 if memory_gb > 36 else 2 / 3)


DEVICES = {
    "m4": Device("m4", "metal", 32, 4.26, 120, 3.0, source="Apple M4, 10-core GPU"),
    "m4-pro": Device("m4-pro", "metal", 48, 8.5, 273, 5.0, source="Apple M4 Pro, 20-core GPU"),
    "m4-max": Device("m4-max", "metal", 128, 17.0, 546, 6.0, source="Apple M4 Max, 40-core GPU"),
    "m3-max": Device("m3-max", "metal", 128, 16.4, 400, 6.0, source="Apple M3 Max, 40-core GPU"),
    "h100": Device("h100", "cuda", 80, 989.0, 3350, 5.0, sustained=0.4, limit_gb=80,
                   source="NVIDIA H100 SXM5 80 GB"),
}
NAMES = (*DEVICES, "this")


def device(name: str, memory_gb: float | None = None) -> Device:
    """The profile ``name`` (``this`` = measured here), with ``memory_gb`` RAM if given."""
    if name == "this":
        return probe().with_memory(memory_gb)
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(NAMES)}")
    return DEVICES[name].with_memory(memory_gb)


def probe(n: int = 1024, repeats: int = 3) -> Device:
    """This machine: RAM, the accelerator's limit (Metal's working set, when on Metal) and a
    measured matmul throughput in the compute dtype (fp32 on the CPU, bf16 on a GPU),
    with sustained = 1 (the measurement is already sustained)."""
    import os

    import mlx.core as mx

    from .backend import backend

    kind = backend()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    limit = None
    if kind == "metal":
        info = mx.metal.device_info()
        ram = info.get("memory_size", ram * GiB) / GiB
        limit = info.get("max_recommended_working_set_size", 0) / GiB or None
    dtype = mx.float32 if kind == "cpu" else mx.bfloat16
    a = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ a)
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ a)
    secs = (time.perf_counter() - t) / repeats
    tflops = 2 * n**3 / secs / 1e12
    return Device("this", kind, round(ram, 1), tflops, 0.0, 1.0, sustained=1.0, limit_gb=limit,
                  source=f"measured here: {n}x{n} {dtype} matmul")


def machine_memory_bytes() -> int | None:
    """What the current backend can hold: Metal's recommended working set, else the RAM
    available now (Linux ``MemAvailable``) or in all; None if unknown."""
    import mlx.core as mx

    try:
        if mx.metal.is_available():
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
    except (AttributeError, KeyError, RuntimeError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
