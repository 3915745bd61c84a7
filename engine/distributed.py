"""Tensor-parallel process groups: the collectives the sharded model and the SPMD engine use, and rank spawning.

Every rank of a tensor-parallel engine is one process that runs the same code on the same inputs (SPMD): the
same scheduler, the same forward, the same sampled tokens (rank 0's, broadcast by `Engine.sample`). The ranks
talk through a `TPGroup`:

- `all_reduce_`, `all_gather` and `broadcast_` carry the model's activations (row-parallel outputs, vocabulary
  slices, context-parallel K/V) on the device group: gloo on CPU, NCCL on CUDA;
- `broadcast_object`, `agree_min` and `barrier` carry small control data on a gloo group (CPU tensors, even
  on CUDA: cheaper than a device round trip for a few bytes).

Timeouts: start-up is slow and uneven (each rank loads its shard of the weights), so the rendezvous and
`startup_barrier()` run under `startup_timeout_s` (30 minutes); every collective after that runs on groups made
with the short `timeout_s`, so a rank whose peer died or hung raises within `timeout_s` instead of hanging.

A one-rank group (`TPGroup.single`) does no collective at all: the single-rank engine runs exactly as before.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist

from engine.device import resolve_device
from engine.ports import free_port

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0  # rendezvous and weight loading: ranks start and load at different speeds


class PendingReduce:
    """A collective in flight (`TPGroup.all_reduce_async`, `all_gather_async`); `wait()` gives its result."""

    def __init__(self, t: torch.Tensor, work: Any, ready_at: float, parts: list[torch.Tensor] | None = None) -> None:
        self._t, self._work, self._ready_at, self._parts = t, work, ready_at, parts

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._ready_at:  # the emulated interconnect: sleep out what is left of its latency
            time.sleep(max(0.0, self._ready_at - time.monotonic()))
            self._ready_at = 0.0
        if self._parts is not None:  # a gather: the ranks' parts, concatenated in rank order
            self._t, self._parts = torch.cat(self._parts), None
        return self._t


class TPGroup:
    """One rank's view of its tensor-parallel group (see the module docstring)."""

    def __init__(
        self,
        rank: int,
        size: int,
        device: torch.device,
        group: Any = None,
        control: Any = None,
        timeout_s: float | None = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.timeout_s = timeout_s
        self._group = group  # model collectives (device tensors)
        self._control = control  # control data (CPU tensors, gloo)
        # Benchmarking aid, off by default: every model all-reduce completes no sooner than this many seconds after
        # it was launched (waiting sleeps, burning no CPU), as on a slower interconnect than loopback.
        self.emulated_latency_s = 0.0

    @classmethod
    def single(cls, device: torch.device | str) -> TPGroup:
        """The group of a single-rank engine: every collective is a no-op."""
        return cls(0, 1, torch.device(device))

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns `t`."""
        return self.all_reduce_async(t).wait()

    def all_reduce_async(self, t: torch.Tensor) -> PendingReduce:
        """Launch the in-place sum of `t` over the ranks; `.wait()` returns `t` once it is complete. Two-batch
        overlap launches one micro-batch's reduce and computes the other's stage before waiting for it."""
        if self.size == 1:
            return PendingReduce(t, None, 0.0)
        work = dist.all_reduce(t, group=self._group, async_op=True)
        ready = time.monotonic() + self.emulated_latency_s if self.emulated_latency_s else 0.0
        return PendingReduce(t, work, ready)

    def all_gather_async(self, t: torch.Tensor) -> PendingReduce:
        """Launch the gather of every rank's `t` (same shape everywhere); `.wait()` gives them concatenated along
        dim 0 in rank order. DP attention gathers each rank's tokens before the tensor-parallel MLP with it."""
        if self.size == 1:
            return PendingReduce(t, None, 0.0)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        work = dist.all_gather(parts, t, group=self._group, async_op=True)
        ready = time.monotonic() + self.emulated_latency_s if self.emulated_latency_s else 0.0
        return PendingReduce(t, work, ready, parts)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `t` (same shape on every rank), concatenated along `dim` in rank order."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self._group)
        return torch.cat(parts, dim=dim)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `t` into every rank's `t` (same shape and dtype everywhere), in place; returns `t`."""
        if self.size > 1:
            dist.broadcast(t, src, group=self._group)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` (pickled), on every rank; the other ranks' `obj` is ignored."""
        if self.size == 1:
            return obj
        if self.rank == src:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            length = torch.tensor([len(data)], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, src, group=self._control)
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        else:
            buf = torch.empty(int(length.item()), dtype=torch.uint8)
        dist.broadcast(buf, src, group=self._control)
        return obj if self.rank == src else pickle.loads(buf.numpy().tobytes())

    def agree_min(self, values: Sequence[int]) -> list[int]:
        """The elementwise minimum over the ranks of an int list (every rank passes the same length)."""
        values = [int(v) for v in values]
        if self.size == 1 or not values:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._control)
        return [int(v) for v in t.tolist()]

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's int list (the same length on every rank), in rank order: small control data."""
        values = [int(v) for v in values]
        if self.size == 1:
            return [values]
        t = torch.tensor(values, dtype=torch.int64)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self._control)
        return [[int(v) for v in p.tolist()] for p in parts]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self._control)
        return out

    def barrier(self) -> None:
        """Wait for every rank (steady-state timeout)."""
        if self.size > 1:
            dist.barrier(group=self._control)

    def startup_barrier(self) -> None:
        """Wait for every rank under the long start-up timeout: after loading, before the first steady-state
        collective, so a rank that loads slowly is waited for rather than taken for dead."""
        if self.size > 1:
            dist.barrier()

    def leave(self) -> None:
        """Leave the group together, after a run every rank finished: a barrier first, so that no rank tears its
        connections down while a peer may still be reading the last collective's data, then `close()`. (A failing
        run only calls `close()`: its peers may never reach the barrier.)"""
        self.barrier()
        self.close()

    def close(self) -> None:
        """Leave the group (a no-op for one rank, or when it is already gone)."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def rank_device(spec: str | torch.device, rank: int) -> torch.device:
    """The device of rank `rank` for the engine's `--device`: CPU for every rank, or one GPU per rank
    (cuda:<base + rank>, base = the index given in `spec`, else 0)."""
    spec_s = str(spec)
    if spec_s == "auto":
        spec_s = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec_s)
    if device.type != "cuda":
        return resolve_device(device)
    index = (device.index or 0) + rank
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"tensor-parallel rank {rank} needs cuda:{index}, but only {count} GPUs are visible")
    return resolve_device(torch.device("cuda", index))


def init_tp_group(
    rank: int,
    size: int,
    init_address: str,
    device: str | torch.device | Any,
    timeout_s: float,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> TPGroup:
    """Join the group of `size` ranks rendezvousing at `init_address` (`tcp://HOST:PORT`, rank 0 hosts it).

    `device` is the engine's device setting ("auto", "cpu", "cuda", "cuda:N", a torch.device, or anything
    with a `.device` such as an EngineConfig); this rank's device is `rank_device(device, rank)`."""
    if not isinstance(device, (str, torch.device)) and hasattr(device, "device"):
        device = device.device
    dev = rank_device(device, rank)
    if size == 1:
        return TPGroup.single(dev)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside [0, {size})")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    startup = timedelta(seconds=startup_timeout_s)
    steady = timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=init_address, rank=rank, world_size=size, timeout=startup)
    control = dist.new_group(backend="gloo", timeout=steady)
    group = dist.new_group(backend="nccl", timeout=steady) if dev.type == "cuda" else control
    log.info("tensor-parallel rank %d/%d on %s (collective timeout %.0fs)", rank, size, dev, timeout_s)
    return TPGroup(rank, size, dev, group=group, control=control, timeout_s=timeout_s)


# -- spawning ranks ---------------------------------------------------------------------------------------


def init_address(host: str = "127.0.0.1") -> str:
    """A fresh rendezvous address for a group whose rank 0 runs on this machine (its port drawn below the
    ephemeral range, engine/ports.py: gloo's own connections could take a bind(0) port before rank 0 binds)."""
    return f"tcp://{host}:{free_port(host)}"


def spawn_followers(
    target: Callable[..., Any], args: Sequence[Any], size: int, name: str = "tp-rank"
) -> list[BaseProcess]:
    """Start ranks 1..size-1 as spawned processes running `target(rank, *args)` (`target` must be a module-level
    function); the caller is rank 0. A follower exits non-zero when `target` raises, and exits (1) by itself
    when this process dies, so no rank outlives its leader."""
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []
    try:
        for rank in range(1, size):
            p = ctx.Process(target=_follower_main, args=(target, rank, tuple(args), os.getpid()), name=f"{name}{rank}")
            p.start()
            procs.append(p)
    except BaseException:
        stop_followers(procs)
        raise
    return procs


def _follower_main(target: Callable[..., Any], rank: int, args: tuple, parent: int) -> None:
    def orphan_watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # the leader is gone (killed): nothing will ever complete our collectives

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()
    # `dump_stacks` asks a follower that does not finish where it is stuck: every thread's stack to stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    target(rank, *args)


def dump_stacks(procs: Sequence[BaseProcess], wait_s: float = 1.0) -> None:
    """Have each follower still running print every thread's stack to its stderr (before it is stopped)."""
    alive = [p for p in procs if p.is_alive() and p.pid is not None]
    for p in alive:
        with contextlib.suppress(OSError):
            os.kill(p.pid, signal.SIGUSR1)  # type: ignore[arg-type]
    if alive:
        time.sleep(wait_s)


def stop_followers(procs: Sequence[BaseProcess], timeout_s: float = 5.0) -> None:
    """Terminate the followers still running, then kill those that do not exit within `timeout_s`."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


class FollowerWatch:
    """Calls `on_failure(process)` (from a watcher thread) as soon as a follower exits non-zero or is killed,
    until `stop()`: the leader may be blocked in a collective, or still loading, when a follower dies."""

    def __init__(
        self, procs: Sequence[BaseProcess], on_failure: Callable[[BaseProcess], None], interval_s: float = 0.2
    ) -> None:
        self._procs = list(procs)
        self._on_failure = on_failure
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follower-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for p in self._procs:
                if p.exitcode not in (None, 0):
                    self._on_failure(p)
                    return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


__all__ = [
    "STARTUP_TIMEOUT_S",
    "FollowerWatch",
    "PendingReduce",
    "TPGroup",
    "free_port",
    "init_address",
    "init_tp_group",
    "rank_device",
    "spawn_followers",
    "stop_followers",
]
