"""Every ZMQ control message between prefill and decode, in one place (DESIGN §3.3).

Each message is a typed dataclass. On the wire it is a msgpack map carrying the protocol version and the
message type next to the fields. `decode` checks version, type and every field's type, and raises
`ProtocolError` for anything else, so receive loops can log and drop bad input instead of crashing.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that is not a valid pdserve control message of this version."""


class TransferState(enum.IntEnum):
    """Per-room transfer state (DESIGN §3.4). Ordered: states only move to higher values; FAILED is sticky."""

    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4


@dataclass
class Message:
    TYPE: ClassVar[str] = ""


@dataclass
class Registration(Message):
    """Decode → prefill, once per connection: where decode's KV memory is and how to reach it."""

    TYPE: ClassVar[str] = "register"
    session: str  # decode's unique session id (its control endpoint)
    endpoint: str  # tcp://host:port where decode receives status messages
    backend: str
    backend_metadata: bytes
    k_bases: list[int]  # per layer
    v_bases: list[int]
    page_bytes: int
    num_pages: int
    aux_base: int
    aux_row_bytes: int
    aux_rows: int
    tp_rank: int
    tp_size: int


@dataclass
class TransferInfo(Message):
    """Decode → prefill, per request: where this room's KV and aux row go."""

    TYPE: ClassVar[str] = "transfer_info"
    room: int
    session: str
    dst_pages: list[int]
    aux_row: int
    prompt_len: int
    required_dsts: int = 1  # how many decode ranks the prefill rank must hear from before it may send


@dataclass
class Status(Message):
    """Prefill → decode: the room's state. Terminal states are sent only once no write can still land,
    unless `drained` says otherwise (a write hung past its timeout)."""

    TYPE: ClassVar[str] = "status"
    room: int
    state: int  # TransferState
    sender_rank: int
    error: str = ""
    drained: bool = True


@dataclass
class Abort(Message):
    """Either direction: stop this room. The receiver answers with AbortAck once its writes drained."""

    TYPE: ClassVar[str] = "abort"
    room: int
    endpoint: str  # where to send the ack
    reason: str = ""


@dataclass
class AbortAck(Message):
    TYPE: ClassVar[str] = "abort_ack"
    room: int
    sender_rank: int


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Registration, TransferInfo, Status, Abort, AbortAck)
}


def encode(msg: Message) -> bytes:
    payload = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": msg.TYPE, **payload}, use_bin_type=True)


def decode(data: bytes) -> Message:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"not msgpack: {e}") from e
    if not isinstance(raw, dict):
        raise ProtocolError(f"expected a map, got {type(raw).__name__}")
    version = raw.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")
    cls = MESSAGE_TYPES.get(raw.pop("type", None))
    if cls is None:
        raise ProtocolError(f"unknown message type {raw.get('type')!r}")
    return _build(cls, raw)


def _build(cls: type[Message], raw: dict[str, Any]) -> Message:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.TYPE}: missing field {f.name!r}")
            continue
        value = raw.pop(f.name)
        if not _matches(value, hints[f.name]):
            raise ProtocolError(f"{cls.TYPE}: field {f.name!r} has wrong type {type(value).__name__}")
        kwargs[f.name] = value
    if raw:
        raise ProtocolError(f"{cls.TYPE}: unknown fields {sorted(raw)}")
    return cls(**kwargs)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "AbortAck",
    "Message",
    "ProtocolError",
    "Registration",
    "Status",
    "TransferInfo",
    "TransferState",
    "decode",
    "encode",
]
