"""One rid rule for the router and the servers (`contracts.pd`), checked through a real stack.

A string rid on a batch of n names prompt i `<rid>_<i>`: through the router such a request must work exactly as it
does without a rid. A rid that does not fit the prompts must be refused with the same 400 (param and message)
whether the router or a server sees it first, so a client cannot tell which one it talked to.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from harness.stack import Stack

pytestmark = pytest.mark.timeout(300)

BATCH = {"text": ["Hello", "1 2 3 4"], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack("mooncake")
    yield s
    s.stop()


def _generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=120)


def test_string_rid_on_a_batch_names_each_prompt(stack: Stack) -> None:
    plain = _generate(stack.router_url, BATCH)
    named = _generate(stack.router_url, {**BATCH, "rid": "grp"})
    assert plain.status_code == 200, plain.text
    assert named.status_code == 200, named.text
    assert [o["output_ids"] for o in named.json()] == [o["output_ids"] for o in plain.json()]
    assert all(len(o["output_ids"]) == 4 for o in named.json())


@pytest.mark.parametrize("rid", [["only-one"], ["a", "a"], 7])
def test_bad_rid_gets_the_same_400_from_router_and_servers(stack: Stack, rid: object) -> None:
    body = {**BATCH, "rid": rid}
    doors = {"router": stack.router_url, "prefill": stack.prefill_url, "decode": stack.decode_url}
    answers = {name: _generate(url, body) for name, url in doors.items()}
    errors = {}
    for name, r in answers.items():
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        errors[name] = (err["type"], err["param"], err["message"])
    assert errors["router"] == errors["prefill"] == errors["decode"], errors
    assert errors["router"][:2] == ("invalid_request_error", "rid")
