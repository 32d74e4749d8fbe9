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

Links (:data:`LINKS`, the one place their figures live): each has its nominal line rate
and the rate the planner uses, what MLX's collectives achieve over it where that is
published, else the TCP payload rate of the wire; none is measured here (no Macs or NICs
on the dev machine), so pass ``link_gbps=`` with your own figure
(``benchmarks/bench_distributed.py`` measures an all_sum).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .train_config import TrainConfig


@dataclass(frozen=True)
class Link:
    """A link between two machines. ``gbps`` (Gbit/s, one direction) is what the planner
    uses; ``nominal_gbps`` the line rate; ``latency`` seconds per message."""

    name: str
    nominal_gbps: float
    gbps: float
    latency: float
    source: str


# TCP payload share of a 1500-byte-MTU Ethernet frame: 1448 bytes of 1538 on the wire
# (preamble, header, FCS, gap; IP and TCP headers with timestamps) = 94.1%.
_TCP_SHARE = 1448 / 1538
LINKS = {
    # Thunderbolt 5: 80 Gb/s each way (120 Gb/s "Bandwidth Boost" one way, 40 back, for
    # displays). MLX send/recv over JACCL (RDMA over Thunderbolt 5, macOS 26.2+) measured
    # 3.5-3.8 GB/s sustained between M3 Ultras (ml-explore/mlx issue 3207, MLX 0.30, macOS
    # 26.3.1): 28 Gbit/s, the low end, is used. RDMA latency "under 50 us" (Apple TN3205 as
    # reported; TCP over Thunderbolt ~300 us). TCP over the same cable: iperf3 52-56 Gbit/s
    # with 4 streams (exo-explore/exo PR 2063); MLX's ring backend over Thunderbolt: 48
    # Gbit/s single ring (ml-explore/mlx PR 1985) -- pass link_gbps= for those.
    "thunderbolt5": Link("thunderbolt5", 80.0, 28.0, 50e-6,
                         "MLX send/recv over JACCL RDMA, 3.5 GB/s measured (ml-explore/mlx#3207)"),
    # Ethernet: no published MLX figure; the TCP payload rate, latency an assumption (small
    # next to a ring attention step's megabyte messages)
    "10gbe": Link("10gbe", 10.0, 10.0 * _TCP_SHARE, 100e-6, "TCP payload rate of 10GbE at 1500 MTU"),
    "1gbe": Link("1gbe", 1.0, 1.0 * _TCP_SHARE, 200e-6, "TCP payload rate of 1GbE at 1500 MTU"),
}


def get_link(name: str, gbps: float | None = None) -> Link:
    """The profile ``name`` (with ``gbps`` instead of its rate if given)."""
    if name not in LINKS:
        raise ConfigError(f"link {name!r} is not one of {', '.join(LINKS)}; use --link {'|'.join(LINKS)}")
    if gbps is not None and not gbps > 0:
        raise ConfigError(f"--link-gbps must be a positive rate in Gbit/s, got {gbps}")
    lk = LINKS[name]
    return lk if gbps is None else Link(lk.name, lk.nominal_gbps, gbps, lk.latency, f"given: {gbps:g} Gbit/s")
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
        return (f"{self.ranks} ranks over {self.link} ({self.gbps:.3g} Gbit/s): data-parallel all-reduce of "
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
        link_gbps: a measured bandwidth instead of the link's (:data:`LINKS`).
    """
    lk = get_link(link, link_gbps)
    if ranks < 1:
        raise ConfigError(f"ranks={ranks} must be >= 1")
    gbps, latency = lk.gbps, lk.latency
    nbytes = lora_params * grad_bytes_per_param
    compute = seconds_per_micro_step * grad_accumulation / ranks
    comm = allreduce_seconds(nbytes, ranks, gbps, latency)
    return ScaleOut(ranks=ranks, link=link, gbps=gbps, grad_bytes=nbytes, compute_seconds_per_step=compute,
                    allreduce_seconds_per_step=comm, seconds_per_step=compute + comm,
                    single_seconds_per_step=seconds_per_micro_step * grad_accumulation,
                    adapter_parallel_speedup=float(ranks))
