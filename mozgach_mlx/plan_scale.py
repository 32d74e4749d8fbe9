"""How training time scales over several processes / machines (``mz.plan(..., ranks=, link=)``).

Data-parallel (``--distributed data``): an optimizer step of ``grad_accumulation``
micro-batches costs ``grad_accumulation / ranks`` micro-batch steps of compute per rank,
plus one all-reduce of the LoRA gradients. A ring all-reduce of ``n`` bytes over ``p``
ranks moves ``2 (p - 1) / p * n`` bytes through each rank's link in ``2 (p - 1)`` messages
(Patarasuk & Yuan, 2009), so it takes ``2 (p - 1) / p * n / bandwidth + 2 (p - 1) *
latency``. The traffic is *negligible* when it is under 1% of the step's compute,
*noticeable* under 10%, else it *limits* the speed-up.

Adapter-parallel (``--distributed adapters``): no per-step traffic; a fleet takes
``1 / ranks`` of the single process's time when the domains balance (the largest domain
bounds it), plus each adapter's files sent once to rank 0.

Link speeds are nominal line rates, not measured here (no Macs or NICs on the dev
machine); real TCP throughput is lower, so pass ``link_gbps=`` with a measured figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .train_config import TrainConfig

# name -> (line rate in Gbit/s, per-message latency in seconds): nominal figures
LINKS = {
    "thunderbolt5": (80.0, 10e-6),  # Thunderbolt 5 between Macs (JACCL RDMA; TCP over it is slower)
    "10gbe": (10.0, 50e-6),
    "1gbe": (1.0, 100e-6),
}
NEGLIGIBLE = 0.01
NOTICEABLE = 0.10


def allreduce_seconds(nbytes: float, ranks: int, gbps: float, latency: float) -> float:
    """Seconds of one ring all-reduce of ``nbytes`` over ``ranks`` ranks on a link of
    ``gbps`` Gbit/s with ``latency`` seconds per message."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9 / 8) + 2 * (ranks - 1) * latency


@dataclass
class ScaleOut:
    """The estimate for ``ranks`` processes (seconds; ``step`` = one optimizer step of
    ``grad_accumulation`` micro-batches)."""

    ranks: int
    link: str
    gbps: float
    grad_bytes: int
    compute_seconds_per_step: float  # per rank, data-parallel
    allreduce_seconds_per_step: float
    seconds_per_step: float  # data-parallel: compute + all-reduce
    single_seconds_per_step: float  # one process
    adapter_parallel_speedup: float

    @property
    def traffic_fraction(self) -> float:
        return self.allreduce_seconds_per_step / max(self.compute_seconds_per_step, 1e-30)

    @property
    def verdict(self) -> str:
        f = self.traffic_fraction
        return "negligible" if f < NEGLIGIBLE else "noticeable" if f < NOTICEABLE else "limits the speed-up"

    @property
    def data_parallel_speedup(self) -> float:
        return self.single_seconds_per_step / self.seconds_per_step

    def note(self) -> str:
        return (f"{self.ranks} ranks over {self.link} ({self.gbps:g} Gbit/s nominal): data-parallel all-reduce of "
                f"{self.grad_bytes / 2**20:.1f} MiB of LoRA gradients ~{self.allreduce_seconds_per_step * 1e3:.1f} ms "
                f"per optimizer step vs {self.compute_seconds_per_step:.2f} s of compute per rank "
                f"({self.traffic_fraction:.1%}: {self.verdict}); ~{self.data_parallel_speedup:.2f}x data-parallel, "
                f"up to {self.adapter_parallel_speedup:.0f}x adapter-parallel (balanced domains, no per-step traffic)")


def scale_out(seconds_per_micro_step: float, lora_params: int, ranks: int, link: str = "10gbe", *,
              grad_accumulation: int = TrainConfig.grad_accumulation, grad_bytes_per_param: int = 4,
              link_gbps: float | None = None) -> ScaleOut:
    """Time of data- and adapter-parallel training over ``ranks`` ranks.

    Args:
        seconds_per_micro_step: one micro-batch's forward + backward in one process
            (``Plan.seconds_per_step``).
        lora_params: trainable parameters (their gradients are what travels).
        link: ``thunderbolt5``, ``10gbe`` or ``1gbe`` (see ``LINKS``).
        grad_accumulation: micro-batches per optimizer step (split over the ranks).
        grad_bytes_per_param: 4 (fp32 gradients, what the trainer keeps).
        link_gbps: a measured bandwidth instead of the link's nominal rate.
    """
    if link not in LINKS:
        raise ConfigError(f"link {link!r} is not one of {', '.join(LINKS)}")
    if ranks < 1:
        raise ConfigError(f"ranks={ranks} must be >= 1")
    gbps, latency = LINKS[link]
    gbps = link_gbps or gbps
    nbytes = lora_params * grad_bytes_per_param
    compute = seconds_per_micro_step * grad_accumulation / ranks
    comm = allreduce_seconds(nbytes, ranks, gbps, latency)
    return ScaleOut(ranks=ranks, link=link, gbps=gbps, grad_bytes=nbytes, compute_seconds_per_step=compute,
                    allreduce_seconds_per_step=comm, seconds_per_step=compute + comm,
                    single_seconds_per_step=seconds_per_micro_step * grad_accumulation,
                    adapter_parallel_speedup=float(ranks))
