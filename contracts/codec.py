"""One wire codec for every typed record pdserve sends over ZMQ (front <-> scheduler, prefill <-> decode).

A channel is a `Codec`: a protocol version and the `Record` dataclasses it carries. On the wire a record
is a msgpack map of its fields plus `v` (the version) and `type` (the record's TYPE). `decode` checks the
version, the type and every field against its annotation (no missing required field, no unknown field, no
wrong type) and raises `CodecError` for anything else, so that a receive loop can log and drop bad input
instead of crashing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

__all__ = ["Codec", "CodecError", "Record"]


class CodecError(ValueError):
    """Bytes that are not a valid record of this channel and version."""


@dataclass
class Record:
    """Base of every wire record; subclasses are dataclasses with a unique `TYPE`."""

    TYPE: ClassVar[str] = ""


class Codec:
    """Encodes and strictly decodes the records of one channel."""

    def __init__(self, name: str, version: int, records: Iterable[type[Record]]) -> None:
        self.name = name
        self.version = version
        self.records: dict[str, type[Record]] = {}
        for cls in records:
            if not cls.TYPE or cls.TYPE in self.records:
                raise ValueError(f"{name}: record {cls.__name__} needs a unique TYPE, got {cls.TYPE!r}")
            self.records[cls.TYPE] = cls
        # Resolved once: get_type_hints on every decode would dominate the cost of small messages.
        self._hints = {t: typing.get_type_hints(c) for t, c in self.records.items()}

    def encode(self, msg: Record) -> bytes:
        if self.records.get(msg.TYPE) is not type(msg):
            raise TypeError(f"{self.name}: {type(msg).__name__} is not a record of this channel")
        payload = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
        return msgpack.packb({"v": self.version, "type": msg.TYPE, **payload}, use_bin_type=True)

    def decode(self, data: bytes) -> Record:
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated exception types
            raise CodecError(f"{self.name}: not msgpack: {e}") from e
        if not isinstance(raw, dict):
            raise CodecError(f"{self.name}: expected a map, got {type(raw).__name__}")
        version = raw.pop("v", None)
        if version != self.version:
            raise CodecError(f"{self.name}: unsupported version {version!r} (this side speaks {self.version})")
        kind = raw.pop("type", None)
        cls = self.records.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise CodecError(f"{self.name}: unknown record type {kind!r}")
        return self._build(cls, raw)

    def _build(self, cls: type[Record], raw: dict[str, Any]) -> Record:
        hints = self._hints[cls.TYPE]
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise CodecError(f"{self.name}: {cls.TYPE}: missing field {f.name!r}")
                continue
            value = raw.pop(f.name)
            if not _matches(value, hints[f.name]):
                raise CodecError(f"{self.name}: {cls.TYPE}: field {f.name!r} has wrong type {type(value).__name__}")
            kwargs[f.name] = float(value) if hints[f.name] is float else value
        if raw:
            raise CodecError(f"{self.name}: {cls.TYPE}: unknown fields {sorted(raw)}")
        return cls(**kwargs)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # msgpack keeps 0 and 0.0 apart; a float field accepts either
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)
