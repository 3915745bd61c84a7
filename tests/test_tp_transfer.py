"""KV transfer between tensor-parallel sides of different TP sizes: every rank its own process, real engines on
loopback, both backends (harness/transfer_peer.py peers: a model-independent layout, no engine).

Checked: each decode rank's pages hold exactly the KV heads it owns, byte for byte what a TP1 -> TP1 run lands
(head by head); the aux row reaches decode rank 0 only; each prefill rank counts the bytes it wrote; a prefill
rank killed mid-transfer, or an abort on one decode rank, fails the room on every rank of both sides (no hang),
and every page and aux row is free afterwards; a decode whose layout cannot be served is refused, naming both
layouts.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from engine.parallel import kv_head_range
from harness.peer_proc import PeerProc
from tests.test_transfer_e2e import BACKENDS, backend_available

TIMEOUTS = dict(bootstrap=8, waiting_for_input=8, transferring=8, abort_ack=8, heartbeat_interval=0.2,
                heartbeat_failures=2, http=1)  # fmt: skip
LAYERS, PAGE, HEAD_DIM, ITEMSIZE = 2, 4, 8, 4  # float32
SRC = [3, 4, 5, 9, 10, 20]
DST = [7, 8, 30, 31, 32, 2]  # partly contiguous on both sides
PROMPT = 22
_rooms = itertools.count(20_000)


@dataclass
class Sides:
    prefills: list[PeerProc]
    decodes: list[PeerProc]
    heads: int

    @property
    def addr(self) -> str:
        return self.prefills[0].info["bootstrap_addr"]

    def all(self) -> list[PeerProc]:
        return [*self.prefills, *self.decodes]

    def close(self) -> None:
        with ThreadPoolExecutor(len(self.all())) as pool:  # each waits for its process to exit
            list(pool.map(PeerProc.close, self.all()))


def start(backend: str, heads: int, p: int, d: int, decode_heads: int | None = None) -> Sides:
    """Prefill TP `p` and decode TP `d` over a model of `heads` KV heads (`decode_heads`: decode's model differs)."""
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    common = dict(backend=backend, timeouts=TIMEOUTS, num_layers=LAYERS, page_size=PAGE, head_dim=HEAD_DIM)
    first = PeerProc(role="prefill", tp_rank=0, tp_size=p, num_kv_heads=heads, **common)
    addr = first.info["bootstrap_addr"]
    cfgs = [dict(role="prefill", tp_rank=i, tp_size=p, num_kv_heads=heads, bootstrap_addr=addr) for i in range(1, p)]
    cfgs += [dict(role="decode", tp_rank=j, tp_size=d, num_kv_heads=decode_heads or heads) for j in range(d)]
    with ThreadPoolExecutor(len(cfgs)) as pool:  # engines start in parallel: each waits more than it computes
        peers = list(pool.map(lambda cfg: PeerProc(**common, **cfg), cfgs))
    return Sides([first, *peers[: p - 1]], peers[p - 1 :], heads)


def open_room(sides: Sides) -> int:
    room = next(_rooms)
    for prefill in sides.prefills:
        prefill.call("alloc", room=room, n=len(SRC), pages=SRC)
    for decode in sides.decodes:
        decode.call("alloc", room=room, n=len(DST), pages=DST)
        decode.call("create", room=room, bootstrap_addr=sides.addr, prompt_len=PROMPT)
    for prefill in sides.prefills:
        prefill.call("create", room=room)
    for prefill in sides.prefills:  # ready once every decode rank's info arrived
        prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 15)
    return room


def transfer(sides: Sides, room: int, token: int = 321) -> list[dict]:
    """Every prefill rank sends layer 0, then layer 1 with the aux row; returns each decode rank's final poll."""
    for prefill in sides.prefills:
        prefill.call("send", room=room, start=0, end=1)
        prefill.call("send", room=room, start=1, end=LAYERS)
        prefill.call("finish", room=room, prompt_len=PROMPT, token=token, logprob=-0.75)
    outs = [decode.wait_state(room, {"SUCCESS", "FAILED"}, 15) for decode in sides.decodes]
    for prefill in sides.prefills:
        assert prefill.wait_state(room, {"SUCCESS", "FAILED"}, 10)["state"] == "SUCCESS"
    return outs


def release_all(sides: Sides, room: int, alive: list[PeerProc] | None = None) -> None:
    for peer in alive or sides.all():
        peer.release(room, timeout=15)
    for peer in alive or sides.all():
        peer.assert_clean()


def by_model_head(decode: PeerProc) -> dict[tuple[int, int, int], str]:
    """(region, page index in DST, model head) -> sha1 of that head of that page, as this decode rank holds it."""
    out = decode.call("head_hash", pages=DST)
    return {
        (region, i, out["start"] + h): digest
        for region, pages in enumerate(out["hashes"])
        for i, heads in enumerate(pages)
        for h, digest in enumerate(heads)
    }


_reference: dict[tuple[str, int], dict[tuple[int, int, int], str]] = {}


def reference(backend: str, heads: int) -> dict[tuple[int, int, int], str]:
    """What a TP1 -> TP1 run lands in decode's pages, per (region, page, model head)."""
    if (backend, heads) not in _reference:
        sides = start(backend, heads, 1, 1)
        try:
            room = open_room(sides)
            (out,) = transfer(sides, room)
            assert out["state"] == "SUCCESS", out
            _reference[(backend, heads)] = by_model_head(sides.decodes[0])
            release_all(sides, room)
        finally:
            sides.close()
    return _reference[(backend, heads)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.mark.parametrize(
    ("heads", "p", "d"),
    [(4, 2, 1), (4, 1, 2), (4, 2, 2), (4, 4, 2), (1, 2, 1), (1, 1, 2)],
    ids=["P2-D1", "P1-D2", "P2-D2", "P4-D2", "H1-P2-D1", "H1-P1-D2"],
)
def test_each_decode_rank_gets_exactly_its_heads(backend: str, heads: int, p: int, d: int):
    want = reference(backend, heads)
    sides = start(backend, heads, p, d)
    try:
        room = open_room(sides)
        outs = transfer(sides, room)
        assert all(out["state"] == "SUCCESS" for out in outs), outs
        # the aux row reaches decode rank 0 only: rank 0 reads it, the others' rows were never written
        assert outs[0]["aux"] == [room, PROMPT, 321, -0.75]
        assert all("aux" not in out and out["aux_memory"] == [0, 0, 0, 0.0] for out in outs[1:]), outs
        for j, decode in enumerate(sides.decodes):
            got = by_model_head(decode)
            owned = kv_head_range(heads, d, j)
            assert {h for _, _, h in got} == set(range(owned.start, owned.stop))
            assert got == {key: want[key] for key in got}, f"decode rank {j} holds other bytes than TP1 -> TP1"
        # each prefill rank counts what it wrote: together, every decode rank's heads of every page, once
        wrote = [prefill.call("bytes_total")["bytes"] for prefill in sides.prefills]
        head_pages = len(DST) * sum(kv_head_range(heads, d, j).count for j in range(d))
        assert sum(wrote) == head_pages * 2 * LAYERS * PAGE * HEAD_DIM * ITEMSIZE + 64  # + the aux row
        release_all(sides, room)
    finally:
        sides.close()


@pytest.mark.parametrize("killed", [0, 1], ids=["bootstrap-rank", "other-rank"])
def test_prefill_rank_killed_mid_transfer_fails_the_room_everywhere(backend: str, killed: int):
    sides = start(backend, 4, 2, 2)
    try:
        room = open_room(sides)
        for prefill in sides.prefills:
            prefill.call("send", room=room, start=0, end=1)
            prefill.call("send", room=room, start=1, end=LAYERS, event=f"hold-{room}")
        for decode in sides.decodes:
            decode.wait_state(room, {"TRANSFERRING"}, 10)
        sides.prefills[killed].kill()
        for decode in sides.decodes:  # the heartbeat sees the rank's control socket gone: no waiting for deadlines
            out = decode.wait_state(room, {"FAILED"}, 5)
            assert "lost connection with prefill" in out["error"], out
        survivor = sides.prefills[1 - killed]
        out = survivor.wait_state(room, {"FAILED"}, 5)  # decode aborted it: it must stop writing
        assert "aborted by decode" in out["error"], out
        survivor.call("complete", event=f"hold-{room}")  # its held chunk drains; then it acknowledges
        release_all(sides, room, alive=[survivor, *sides.decodes])
    finally:
        sides.close()


@pytest.fixture(scope="module", params=BACKENDS)
def p2d2(request):
    sides = start(request.param, 4, 2, 2)
    yield sides
    sides.close()


def test_an_abort_on_one_decode_rank_fails_the_room_on_every_rank(p2d2: Sides):
    sides = p2d2
    room = open_room(sides)
    sides.prefills[0].call("send", room=room, start=0, end=1)
    sides.decodes[1].call("abort", room=room)
    for peer in sides.all():
        out = peer.wait_state(room, {"FAILED"}, 10)
        assert "aborted" in out["error"], out
    release_all(sides, room)
    room = open_room(sides)  # the ranks work on
    assert all(out["state"] == "SUCCESS" for out in transfer(sides, room))
    release_all(sides, room)


def test_a_decode_whose_layout_cannot_be_served_is_refused_naming_both(p2d2: Sides):
    backend = p2d2.prefills[0].cfg["backend"]
    decode = PeerProc(role="decode", backend=backend, timeouts=TIMEOUTS, num_layers=LAYERS, page_size=PAGE,
                      head_dim=HEAD_DIM, num_kv_heads=2)  # fmt: skip
    try:
        room = next(_rooms)
        decode.call("alloc", room=room, n=1)
        decode.call("create", room=room, bootstrap_addr=p2d2.addr, prompt_len=1)
        out = decode.wait_state(room, {"FAILED"}, 10)
        assert "prefill TP2 x 4 KV heads vs decode TP1 x 2 KV heads" in out["error"], out
        assert "num_kv_heads: prefill 4 vs decode 2" in out["error"] and out["safe"]
        decode.release(room)
        decode.assert_clean()
    finally:
        decode.close()
