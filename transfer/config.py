"""Settings of the transfer layer. Defaults are for production; tests shorten the timeouts."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("mooncake", "nixl")


@dataclass
class Timeouts:
    bootstrap: float = 300.0  # prefill: waiting for decode's transfer info; decode: resolving/registering
    waiting_for_input: float = 300.0  # prefill: forward not started; decode: prefill has not started writing
    transferring: float = 120.0  # writes started but not all completed
    abort_ack: float = 30.0  # decode keeps a failed room's pages until ack'd, prefill dead, or this long
    heartbeat_interval: float = 5.0  # decode → prefill bootstrap /health
    heartbeat_failures: int = 2  # consecutive misses that declare a prefill lost
    http: float = 5.0  # one bootstrap HTTP call

    def validate(self) -> None:
        for name in ("bootstrap", "waiting_for_input", "transferring", "abort_ack", "heartbeat_interval", "http"):
            if getattr(self, name) <= 0:
                raise ValueError(f"timeout {name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_failures < 1:
            raise ValueError(f"heartbeat_failures must be >= 1, got {self.heartbeat_failures}")


@dataclass
class TransferConfig:
    backend: str = "mooncake"
    host: str = "127.0.0.1"  # the address peers reach this process on (pod IP on clusters)
    zmq_port: int = 0  # control socket; 0 picks a free port
    mooncake_protocol: str = "tcp"  # rdma on clusters
    device_names: str = ""  # RDMA NICs for Mooncake, e.g. "mlx5_0,mlx5_1"
    tp_rank: int = 0
    tp_size: int = 1
    # Every rank's pool holds all the model's KV heads (context-parallel prefill ranks): a rank still writes only
    # the heads its TP rank would own (transfer/head_map.py), so the ranks split the push between them.
    full_kv_heads: bool = False
    # DP attention on prefill (engine/dp_attention.py): each of the tp_size ranks holds every head and only its own
    # requests, so room R is written whole (every head, and the aux row) by rank R % dp_size alone: to the head map
    # that rank is a one-rank prefill. 1: every rank writes its heads of every room.
    dp_size: int = 1
    aux_rows: int = 1024  # in-flight rooms one side can hold
    # Benchmarking aid, off by default: pretend the link carries this many GB/s (each write completes no
    # sooner than a serial link of that bandwidth would deliver it). Loopback is far faster than CPU
    # compute, so realistic transfer/compute ratios need it.
    emulated_link_gbps: float | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)

    @property
    def writer(self) -> tuple[int, int]:
        """(size, rank) of this rank among the ranks that write a room, for the head map: a DP-attention rank
        writes its rooms alone, as a one-rank prefill."""
        return (1, 0) if self.dp_size > 1 else (self.tp_size, self.tp_rank)

    @property
    def writes_aux(self) -> bool:
        """This rank writes a room's aux row (the first token): rank 0, or under DP attention the room's owner."""
        return self.dp_size > 1 or self.tp_rank == 0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown transfer backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        if self.dp_size != 1 and (self.dp_size != self.tp_size or not self.full_kv_heads):
            raise ValueError(f"dp_size {self.dp_size}: DP attention ranks are the {self.tp_size} TP ranks, each "
                             "holding every KV head (full_kv_heads)")  # fmt: skip
        if self.emulated_link_gbps is not None and self.emulated_link_gbps <= 0:
            raise ValueError(f"emulated_link_gbps must be > 0, got {self.emulated_link_gbps}")
        if self.aux_rows < 1:
            raise ValueError(f"aux_rows must be >= 1, got {self.aux_rows}")
        self.timeouts.validate()
