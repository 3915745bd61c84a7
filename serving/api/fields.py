"""Typed access to JSON request fields: every wrong value becomes a 400 that names the field.

All getters share one shape (`get_field`): a missing or null field takes the default, a present one must
pass a type check, and a failure names the field as the client spelled it (`name`, e.g.
`sampling_params.top_k`, when the key sits inside a nested object). One implementation keeps the
messages uniform across the three dialects.

Parameters the server cannot honour are `reject`ed only when their value would change the result:
clients routinely send neutral values (`presence_penalty: 0`, `n: 1`), and those must keep working.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from contracts.http import BodyError, parse_json_object
from serving.api.errors import APIError, bad, tname

__all__ = [
    "UNSUPPORTED_SAMPLING_COMMON",
    "Unsupported",
    "get_bool",
    "get_field",
    "get_int",
    "get_int_list",
    "get_number",
    "get_object",
    "get_stop",
    "is_empty",
    "is_int",
    "is_number",
    "is_one",
    "is_zero",
    "parse_json_body",
    "reject",
    "reject_all",
    "token_ids",
]

T = TypeVar("T")
D = TypeVar("D")

# key -> (is this value harmless?, why the feature is missing): the tables of unsupported parameters.
Unsupported = Mapping[str, tuple[Callable[[Any], bool], str]]


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or 400 (empty, not JSON, not an object, nested too deep, a lone
    surrogate in a string): the rules the router shares, `contracts.http.parse_json_object`."""
    try:
        return parse_json_object(raw)
    except BodyError as exc:
        raise APIError(exc.status, exc.message) from None


def is_int(v: object) -> bool:
    """A JSON integer (bool is an int subclass in Python but not in JSON)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A JSON number, integer or not."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def get_field(
    d: Mapping[str, Any],
    key: str,
    default: D,
    check: Callable[[Any], bool],
    expected: str,
    *,
    name: str | None = None,
    convert: Callable[[Any], T] | None = None,
    show_value: bool = False,
) -> T | D:
    """`d[key]` when it passes `check` (then `convert`ed), `default` when missing or null, else 400.

    The message reads `'<name>' must be <expected>, got <type>` (plus the value's repr with
    `show_value`, for scalars where it helps), and the error's `param` is `name` (default: `key`).
    """
    v = d.get(key)
    if v is None:
        return default
    if not check(v):
        name = name or key
        got = f"{tname(v)} {v!r}" if show_value else tname(v)
        raise bad(name, f"'{name}' must be {expected}, got {got}")
    return convert(v) if convert is not None else v


def get_bool(d: Mapping[str, Any], key: str, default: bool, name: str | None = None) -> bool:
    return get_field(d, key, default, lambda v: isinstance(v, bool), "a boolean", name=name)


def get_int(d: Mapping[str, Any], key: str, default: int | None, name: str | None = None) -> int | None:
    return get_field(d, key, default, is_int, "an integer", name=name, show_value=True)


def get_number(d: Mapping[str, Any], key: str, default: float | None, name: str | None = None) -> float | None:
    return get_field(d, key, default, is_number, "a number", name=name, convert=float, show_value=True)


def _is_stop(v: object) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


def _stop_list(v: str | list[str]) -> list[str]:
    # An empty stop string would match everywhere; OpenAI ignores it too.
    return [s for s in ([v] if isinstance(v, str) else v) if s]


def get_stop(d: Mapping[str, Any], key: str = "stop", name: str | None = None) -> list[str]:
    """Stop strings: one string or a list of them (empty strings dropped)."""
    return get_field(d, key, [], _is_stop, "a string or a list of strings", name=name, convert=_stop_list)


def _is_int_list(v: object) -> bool:
    return isinstance(v, list) and all(is_int(t) for t in v)


def get_int_list(d: Mapping[str, Any], key: str, name: str | None = None) -> list[int]:
    return get_field(d, key, [], _is_int_list, "a list of integers", name=name, convert=list)


def get_object(d: Mapping[str, Any], key: str, name: str | None = None) -> dict[str, Any]:
    """A nested JSON object (empty when missing)."""
    return get_field(d, key, {}, lambda v: isinstance(v, dict), "an object", name=name)


def token_ids(v: list[Any], name: str) -> list[int]:
    """A prompt given as token ids: non-empty, non-negative integers (the vocabulary bound is checked later)."""
    if not v:
        raise bad(name, f"'{name}' must not be empty")
    for t in v:
        if not is_int(t) or t < 0:
            raise bad(name, f"'{name}' must contain non-negative integer token ids, got {t!r}")
    return list(v)


def reject(d: Mapping[str, Any], key: str, harmless: Callable[[Any], bool], why: str, name: str | None = None) -> None:
    """400 when `key` is present with a value that would change the result and is not supported."""
    if key in d and d[key] is not None and not harmless(d[key]):
        raise bad(name or key, f"'{name or key}' is not supported by this server ({why}), got {d[key]!r}")


def reject_all(d: Mapping[str, Any], table: Unsupported, prefix: str | None = None) -> None:
    """`reject` every key of `table`; `prefix` names the enclosing object in messages."""
    for key, (harmless, why) in table.items():
        reject(d, key, harmless, why, name=f"{prefix}.{key}" if prefix else None)


def is_zero(v: Any) -> bool:
    return is_number(v) and v == 0


def is_one(v: Any) -> bool:
    return is_number(v) and v == 1


def is_empty(v: Any) -> bool:
    return v in ({}, [], "")


# Sampling options both dialects (SGLang's sampling_params, OpenAI's top level) name the same way and that
# this server cannot honour: accepted only at their neutral value.
UNSUPPORTED_SAMPLING_COMMON: Unsupported = {
    "presence_penalty": (is_zero, "no penalties"),
    "frequency_penalty": (is_zero, "no penalties"),
    "repetition_penalty": (is_one, "no penalties"),
    "min_p": (is_zero, "no min_p sampling"),
    "logit_bias": (is_empty, "no logit bias"),
    "skip_special_tokens": (lambda v: v is True, "special tokens are always skipped"),
}
