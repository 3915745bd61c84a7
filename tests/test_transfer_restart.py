"""Peer restarts and stopped peers, end to end: real processes, real engines on loopback, both backends.

A prefill or decode killed (-9) and started again on the same ports is a new instance: the other side fails the
old instance's rooms at once with a clear error (pages safe at once: the old process is gone), and new rooms
work right away. A stopped (SIGSTOP) peer holds rooms only until our own deadlines; pages it may still write
stay quarantined until it answers again; after SIGCONT new rooms work.
"""

from __future__ import annotations

import itertools
import time

import pytest

from engine.ports import free_port  # below the ephemeral range: re-bound after a restart
from harness.peer_proc import PeerProc
from tests.test_transfer_e2e import BACKENDS, LAYERS, backend_available

_rooms = itertools.count(5000)
# Deadlines far beyond what the tests wait: whatever ends a room here is the restart or stop handling.
LONG = dict(bootstrap=20, waiting_for_input=20, transferring=20, abort_ack=20, http=1)
# NIXL over UCX's default transports on one host writes through shared memory, so a stopped target is still
# written into; TCP is how NIXL runs between hosts without RDMA, and it makes a stopped peer's write hang.
NIXL_TCP = {"UCX_TLS": "tcp"}


def start(role: str, backend: str, timeouts: dict, **cfg) -> PeerProc:
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    env = NIXL_TCP if backend == "nixl" else None
    return PeerProc(env=env, role=role, backend=backend, timeouts=timeouts, num_layers=LAYERS, **cfg)


def open_room(prefill: PeerProc, decode: PeerProc, pages: list[int], prompt_len: int = 5) -> int:
    room = next(_rooms)
    prefill.call("alloc", room=room, n=len(pages), pages=pages)
    decode.call("alloc", room=room, n=len(pages), pages=pages)
    decode.call("create", room=room, bootstrap_addr=prefill.info["bootstrap_addr"], prompt_len=prompt_len)
    prefill.call("create", room=room)
    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
    return room


def transfer(prefill: PeerProc, decode: PeerProc, room: int, prompt_len: int = 5) -> None:
    prefill.call("send", room=room, start=0, end=LAYERS)
    prefill.call("finish", room=room, prompt_len=prompt_len, token=7, logprob=-0.5)
    out = decode.wait_state(room, {"SUCCESS", "FAILED"}, 10)
    assert out["state"] == "SUCCESS", out
    assert out["aux"] == [room, prompt_len, 7, -0.5]
    prefill.wait_state(room, {"SUCCESS"}, 5)
    prefill.release(room)
    decode.release(room)


def new_room_works(prefill: PeerProc, decode: PeerProc, pages: list[int]) -> None:
    transfer(prefill, decode, open_room(prefill, decode, pages))


def in_flight(prefill: PeerProc, decode: PeerProc) -> tuple[int, int]:
    """One room mid-transfer (first layers written, the rest held by an event) and one waiting for input."""
    writing = open_room(prefill, decode, [1, 2, 3])
    prefill.call("send", room=writing, start=0, end=2)
    prefill.call("send", room=writing, start=2, end=LAYERS, event=f"hold-{writing}")
    decode.wait_state(writing, {"TRANSFERRING"}, 10)
    waiting = open_room(prefill, decode, [4, 5])
    return writing, waiting


def close_all(*peers: PeerProc) -> None:
    for p in peers:
        p.cont()
        p.close()


@pytest.mark.parametrize("detected_by", ["heartbeat", "unknown-session"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_restarted_on_the_same_ports(backend: str, detected_by: str):
    # A restart quicker than the heartbeat's patience (20 misses): the old way never noticed it. With the
    # heartbeat "off" (60 s), only the new instance's UnknownSession answer to a new room can tell.
    beat = (
        dict(heartbeat_interval=0.3, heartbeat_failures=20)
        if detected_by == "heartbeat"
        else dict(heartbeat_interval=60, heartbeat_failures=2)
    )
    timeouts = LONG | beat
    prefill = start("prefill", backend, timeouts, bootstrap_port=free_port(), zmq_port=free_port())
    decode = start("decode", backend, timeouts)
    try:
        new_room_works(prefill, decode, [9])  # registered with the first instance
        writing, waiting = in_flight(prefill, decode)
        old = prefill.info["instance"]
        t0 = time.monotonic()
        prefill = prefill.restarted()
        assert prefill.info["instance"] != old
        assert prefill.info["bootstrap_addr"] == f"127.0.0.1:{prefill.cfg['bootstrap_port']}"  # the same address
        if detected_by == "unknown-session":
            # a new room right away: decode still holds the old registration; the new instance answers
            # UnknownSession, decode registers again and sends the room's info again — no failure
            new_room_works(prefill, decode, [10, 11])
        for room in (writing, waiting):
            out = decode.wait_state(room, {"FAILED"}, 10)
            assert f"restarted (instance {old} -> {prefill.info['instance']})" in out["error"], out
            assert "in-flight transfers are lost" in out["error"] and out["reason"] == "peer_restarted"
            assert out["safe"]  # the old process is gone: nothing of it can still write
            decode.release(room, timeout=1)
        assert time.monotonic() - t0 < 15  # well before any of the 20 s deadlines
        new_room_works(prefill, decode, [12])
        decode.assert_clean()
        prefill.assert_clean()
    finally:
        close_all(prefill, decode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_restarted_on_the_same_port(backend: str):
    timeouts = LONG | dict(heartbeat_interval=0.3, heartbeat_failures=3)
    prefill = start("prefill", backend, timeouts)
    decode = start("decode", backend, timeouts, zmq_port=free_port())
    try:
        writing, waiting = in_flight(prefill, decode)
        decode = decode.restarted()
        # the new decode registers with a new session on the old endpoint: prefill fails the old one's rooms
        room = open_room(prefill, decode, [6, 7])
        out = prefill.wait_state(waiting, {"FAILED"}, 10)
        assert "restarted" in out["error"] and "in-flight transfers are lost" in out["error"], out
        assert out["reason"] == "peer_restarted"
        # the room mid-transfer fails either way: by the restart, or first by its in-flight write to the dead
        # process (which of the two comes first is a race; both name what happened)
        out = prefill.wait_state(writing, {"FAILED"}, 10)
        restarted = "restarted" in out["error"] and out["reason"] == "peer_restarted"
        write_lost = "write" in out["error"] and out["reason"] == "failed"
        assert restarted or write_lost, out
        prefill.call("complete", event=f"hold-{writing}")  # the held chunk drains (nothing is written)
        for old in (writing, waiting):
            prefill.release(old, timeout=10)
        transfer(prefill, decode, room)
        prefill.assert_clean()
        decode.assert_clean()
    finally:
        close_all(prefill, decode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stopped_decode_holds_prefill_rooms_only_until_our_deadline(backend: str):
    timeouts = dict(bootstrap=10, waiting_for_input=10, transferring=3, abort_ack=2, heartbeat_interval=0.3,
                    heartbeat_failures=3, http=1)  # fmt: skip
    prefill = start("prefill", backend, timeouts, num_pages=512)
    decode = start("decode", backend, timeouts, num_pages=512)
    try:
        new_room_works(prefill, decode, [1])  # the engines are connected, as in service
        pages = list(range(10, 400))
        room = open_room(prefill, decode, pages)
        decode.stop()
        t0 = time.monotonic()
        prefill.call("send", room=room, start=0, end=LAYERS)
        prefill.call("finish", room=room, prompt_len=5, token=7, logprob=-0.5)
        out = prefill.wait_state(room, {"FAILED", "SUCCESS"}, 15)
        ended = time.monotonic() - t0
        # our Transferring deadline (3 s), not the engine's own (Mooncake 30 s rounds, NIXL never)
        assert ended < 3 + 5, (ended, out)
        # the hung write resolved (Mooncake: its timeouts, set to ours: 3-5 s) or was cancelled (NIXL: at failure
        # + abort-ack); generous for a loaded machine, yet short of the engine's own 30 s (Mooncake) or never (NIXL).
        # (This once failed in the whole suite only: in-process tests had set Mooncake's variables to 120 s in the
        # pytest process, and this peer inherited them as if an operator had; see set_engine_timeouts.)
        prefill.wait_safe(room, 20)
        assert time.monotonic() - t0 < 25
        prefill.release(room)
        decode.cont()
        decode.wait_state(room, {"FAILED", "SUCCESS"}, 10)
        decode.release(room, timeout=15)  # prefill's word (status or ack) frees decode's pages
        new_room_works(prefill, decode, [2, 3])
        prefill.assert_clean()
        decode.assert_clean()
    finally:
        close_all(prefill, decode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stopped_prefill_fails_rooms_and_quarantines_their_pages(backend: str):
    timeouts = dict(bootstrap=10, waiting_for_input=10, transferring=10, abort_ack=1, heartbeat_interval=0.3,
                    heartbeat_failures=2, http=1)  # fmt: skip
    prefill = start("prefill", backend, timeouts)
    decode = start("decode", backend, timeouts)
    try:
        writing, waiting = in_flight(prefill, decode)
        prefill.stop()
        t0 = time.monotonic()
        for room in (writing, waiting):
            out = decode.wait_state(room, {"FAILED"}, 5)
            assert "lost connection with prefill" in out["error"], out
        assert time.monotonic() - t0 < 5  # the heartbeat, well before the 10 s deadlines
        time.sleep(timeouts["abort_ack"] + 0.5)
        # a stopped prefill may write once it runs again: its pages are held past the abort-ack timeout
        assert not decode.call("poll", room=writing)["safe"]
        prefill.cont()
        prefill.call("complete", event=f"hold-{writing}")  # its last chunk drains; then it acknowledges
        for room in (writing, waiting):
            decode.release(room, timeout=10)
            prefill.wait_state(room, {"FAILED"}, 10)
            prefill.release(room, timeout=10)
        new_room_works(prefill, decode, [6])
        prefill.assert_clean()
        decode.assert_clean()
    finally:
        close_all(prefill, decode)
