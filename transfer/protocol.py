"""Every ZMQ control message between prefill and decode, in one place (DESIGN §3.3).

Each message is a `contracts.codec.Record`; `CODEC` is the transfer control channel, so this channel
encodes and strictly checks its bytes exactly as every other pdserve channel does. On the wire a message
is a msgpack map of its fields plus `v` (PROTOCOL_VERSION) and `type`. `decode` raises `ProtocolError`
(the codec's `CodecError`) for anything that is not a valid message of this version, so receive loops can
log and drop bad input instead of crashing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from contracts.codec import Codec, CodecError, Record

# v2: Status carries the failure's typed reason; v3: instance ids (peer restarts), UnknownSession; v4: tensor
# parallelism on both sides, of different sizes: a KV item is one head of one page, Registration carries the decode
# rank's KV heads, decode registers with and sends its info to every prefill rank, Abort names its sender rank.
PROTOCOL_VERSION = 4

# The codec's own error: `except ProtocolError` catches every decoding failure of this channel.
ProtocolError = CodecError


class TransferState(enum.IntEnum):
    """Per-room transfer state (DESIGN §3.4). Ordered: states only move to higher values; FAILED is sticky."""

    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4


@dataclass
class Registration(Record):
    """Decode rank → each prefill rank, once per connection: where the decode rank's KV memory is, which KV heads
    it holds, and how to reach it. A K or V region's item is one KV head of one page (HND pool): page p, local head
    h is item p * num_kv_heads + h."""

    TYPE: ClassVar[str] = "register"
    session: str  # decode's session id: its control endpoint plus its instance id (new with every start)
    endpoint: str  # tcp://host:port where decode receives status messages
    backend: str
    backend_metadata: bytes
    k_bases: list[int]  # per layer
    v_bases: list[int]
    item_bytes: int  # one KV head of one page: page_size * head_dim * dtype size (the same on every rank)
    num_items: int  # items of each K/V region: (pages + 1) * num_kv_heads
    aux_base: int
    aux_row_bytes: int
    aux_rows: int
    tp_rank: int
    tp_size: int
    kv_head_start: int  # the first of the model's KV heads this decode rank holds
    num_kv_heads: int  # how many it holds
    total_kv_heads: int  # the model's


@dataclass
class TransferInfo(Record):
    """Decode rank → each prefill rank, per request: where this room's KV and aux row go on that decode rank."""

    TYPE: ClassVar[str] = "transfer_info"
    room: int
    session: str
    endpoint: str  # decode's control socket: where an UnknownSession answer goes
    prefill_instance: str  # the prefill instance decode registered with; another one answers UnknownSession
    dst_pages: list[int]
    aux_row: int
    prompt_len: int
    required_dsts: int = 1  # how many decode ranks (decode's TP size) the prefill rank must hear from before it sends


@dataclass
class Status(Record):
    """Prefill → decode: the room's state. Terminal states are sent only once no write can still land,
    unless `drained` says otherwise (a write hung past its timeout)."""

    TYPE: ClassVar[str] = "status"
    room: int
    state: int  # TransferState
    sender_rank: int
    error: str = ""
    drained: bool = True
    reason: str = ""  # a FailureReason value when state is FAILED, so both sides count the same reason
    session: str = ""  # the decode session it is for: a decode restarted on the same endpoint drops it


@dataclass
class Abort(Record):
    """Either direction: stop this room. The receiver answers with AbortAck once its writes drained."""

    TYPE: ClassVar[str] = "abort"
    room: int
    endpoint: str  # where to send the ack
    reason: str = ""
    session: str = ""  # the decode session of the room (sender's or addressee's)
    sender_rank: int = 0  # the sender's TP rank


@dataclass
class UnknownSession(Record):
    """Prefill → decode, answering a TransferInfo: this prefill instance does not know `session` (it restarted,
    or it forgot an idle decode). Decode re-registers and sends the room's info again; it is not a failure."""

    TYPE: ClassVar[str] = "unknown_session"
    room: int
    session: str
    sender_rank: int
    instance: str  # the prefill instance that answered


@dataclass
class AbortAck(Record):
    """The answer to Abort: no write of this room from the sender can still land."""

    TYPE: ClassVar[str] = "abort_ack"
    room: int
    sender_rank: int


CODEC = Codec("transfer", PROTOCOL_VERSION, (Registration, TransferInfo, Status, Abort, AbortAck, UnknownSession))


def encode(msg: Record) -> bytes:
    """The wire bytes of one control message."""
    return CODEC.encode(msg)


def decode(data: bytes) -> Record:
    """The control message in `data`; raises ProtocolError for anything else."""
    return CODEC.decode(data)


__all__ = [
    "CODEC",
    "PROTOCOL_VERSION",
    "Abort",
    "AbortAck",
    "ProtocolError",
    "Registration",
    "Status",
    "TransferInfo",
    "TransferState",
    "UnknownSession",
    "decode",
    "encode",
]
