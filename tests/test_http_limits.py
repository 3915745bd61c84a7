"""contracts.http: the body rules the router and both servers share (size, nesting, strings)."""

from __future__ import annotations

import json

import pytest

from contracts.http import MAX_JSON_DEPTH, BodyError, check_size, declared_length, parse_json_object


def _refused(raw: bytes) -> BodyError:
    with pytest.raises(BodyError) as info:
        parse_json_object(raw)
    return info.value


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 100_000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth: int) -> None:
    err = _refused(b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")
    assert err.status == 400 and "nested deeper" in err.message


def test_nesting_at_the_limit_is_accepted() -> None:
    depth = MAX_JSON_DEPTH - 1  # the object itself is one level
    body = parse_json_object(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
    assert "a" in body


def test_many_brackets_side_by_side_are_not_depth() -> None:
    body = {"input_ids": [[1, 2]] * 500, "x": [{"y": []}] * 100}
    assert parse_json_object(json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    "raw, where",
    [
        (b'{"prompt": "a\\ud800b"}', "prompt"),
        (b'{"prompt": "\\udfff"}', "prompt"),
        (b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "messages.0.content"),
        (b'{"prompt": "\xed\xa0\x80"}', "prompt"),  # a surrogate as CESU bytes, which json.loads lets through
        (b'{"\\ud800": 1}', "body"),
    ],
)
def test_lone_surrogates_are_refused_by_name(raw: bytes, where: str) -> None:
    err = _refused(raw)
    assert err.status == 400 and f"'{where}'" in err.message and "surrogate" in err.message


def test_a_surrogate_pair_is_one_valid_character() -> None:
    assert parse_json_object(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}


@pytest.mark.parametrize(
    "raw, words",
    [(b"", "empty"), (b"  \n", "empty"), (b"\xff\xfe\x00garbage", "not valid JSON"), (b"[1]", "an array"),
     (b'"s"', "a string"), (b"null", "null"), (b"{" * 10, "not valid JSON")],
)  # fmt: skip
def test_not_an_object(raw: bytes, words: str) -> None:
    err = _refused(raw)
    assert err.status == 400 and words in err.message


def test_garbage_error_stays_short() -> None:
    err = _refused(b"x" * 10_000_000)
    assert err.status == 400 and len(err.message) < 300


def test_size_limit() -> None:
    check_size(100, 100)
    with pytest.raises(BodyError) as info:
        check_size(101, 100)
    assert info.value.status == 413 and "--max-body-bytes" in info.value.message


@pytest.mark.parametrize("header, size", [(None, None), ("12", 12), (" 7 ", 7), ("0", 0), ("-1", None), ("x", None)])
def test_declared_length(header: str | None, size: int | None) -> None:
    assert declared_length(header) == size
