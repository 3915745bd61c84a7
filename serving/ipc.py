"""Messages between a server's HTTP front process and its scheduler process (ZMQ over ipc:// sockets).

The front never runs model work: it validates and tokenizes, sends `GenerateRequest`, and turns the
`RequestOutput`s that come back into HTTP responses. The scheduler pushes `SchedulerStats` periodically
(for /get_load, /server_info and gauges) and one `Ready` once the model is loaded.

The channel is one `contracts.codec.Codec` ("ipc", version 1), so both processes reject a message of
another version, an unknown type or a mistyped field with `CodecError` instead of acting on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from contracts.codec import Codec, CodecError, Record

__all__ = [
    "CODEC",
    "AbortRequest",
    "CodecError",
    "GenerateRequest",
    "IpcMessage",
    "Ready",
    "RequestOutput",
    "SchedulerStats",
    "pack",
    "unpack",
]


@dataclass
class IpcMessage(Record):
    """Base of the front <-> scheduler records (a `Record` of this channel's codec)."""


@dataclass
class GenerateRequest(IpcMessage):
    """One prompt. `sampling` holds engine.sampling.SamplingParams fields (already validated by the front)."""

    TYPE: ClassVar[str] = "generate"
    rid: str
    input_ids: list[int]
    sampling: dict[str, Any]
    bootstrap_host: str | None = None  # None with bootstrap_room None: run locally (health_generate)
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    return_logprob: bool = False
    stream: bool = False
    arrival_time: float = 0.0  # time.time() when the front received the HTTP request


@dataclass
class AbortRequest(IpcMessage):
    TYPE: ClassVar[str] = "abort"
    rid: str


@dataclass
class RequestOutput(IpcMessage):
    """Scheduler → front. Zero or more per request (streaming deltas); the last has finished=True.

    A failed request ends with finished=True, finish_reason="abort" and `error` set; `status` is the HTTP
    status the front should answer with when nothing was sent yet (400 client error, 503 overloaded or a
    transfer/peer failure, 500 internal).
    """

    TYPE: ClassVar[str] = "output"
    rid: str
    token_ids: list[int] = field(default_factory=list)  # new since the previous output
    text: str = ""  # new text since the previous output (stop strings already cut)
    logprobs: list[float] = field(default_factory=list)  # one per new token when asked
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    cached_tokens: int = 0


@dataclass
class SchedulerStats(IpcMessage):
    TYPE: ClassVar[str] = "stats"
    running: int
    queued: int  # waiting for bootstrap / pages / a batch
    kv_pages_used: int
    kv_pages_total: int
    in_flight_transfers: int = 0
    prefix_cache_pages: int = 0  # pages the prefill server's prefix cache holds (reusable ones are not "used")
    rank: int = 0  # DP attention: every rank reports its own requests and pool; the front adds them up

    @classmethod
    def total(cls, parts: list[SchedulerStats]) -> SchedulerStats:
        """The server's stats from its ranks' (DP attention: each rank its own requests and KV pool)."""
        names = ("running", "queued", "kv_pages_used", "kv_pages_total", "in_flight_transfers", "prefix_cache_pages")
        return cls(**{n: sum(getattr(p, n) for p in parts) for n in names})


@dataclass
class Ready(IpcMessage):
    """Sent once the scheduler loaded the model; `info` feeds /server_info and /model_info."""

    TYPE: ClassVar[str] = "ready"
    info: dict[str, Any]


CODEC = Codec("ipc", 1, (GenerateRequest, AbortRequest, RequestOutput, SchedulerStats, Ready))


def pack(msg: IpcMessage) -> bytes:
    return CODEC.encode(msg)


def unpack(data: bytes) -> IpcMessage:
    """The message in `data`; raises `CodecError` for anything that is not a valid message of this channel."""
    return cast(IpcMessage, CODEC.decode(data))
