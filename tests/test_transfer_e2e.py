"""KV transfer end to end: prefill and decode in separate processes, real engines on loopback.

Every test ends with both sides reporting every page, aux row and room free.
"""

from __future__ import annotations

import itertools
import time

import pytest
import zmq

from harness.peer_proc import PeerProc

BACKENDS = ["mooncake", "nixl"]
TIMEOUTS = dict(bootstrap=3, waiting_for_input=3, transferring=3, abort_ack=3, heartbeat_interval=0.2,
                heartbeat_failures=2, http=1)  # fmt: skip
LAYERS = 4
_rooms = itertools.count(1000)


def backend_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec("mooncake" if name == "mooncake" else "nixl") is not None


def start_pair(backend: str, **overrides) -> tuple[PeerProc, PeerProc]:
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    cfg = dict(backend=backend, timeouts=TIMEOUTS, num_layers=LAYERS) | overrides
    prefill = PeerProc(role="prefill", **cfg)
    decode = PeerProc(role="decode", **cfg)
    return prefill, decode


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request):
    prefill, decode = start_pair(request.param)
    yield prefill, decode
    prefill.close()
    decode.close()


@pytest.fixture
def clean_pair(pair):
    yield pair
    for side in pair:
        side.assert_clean()


def setup_room(prefill: PeerProc, decode: PeerProc, src: list[int], dst: list[int], prompt_len: int) -> int:
    room = next(_rooms)
    prefill.call("alloc", room=room, n=len(src), pages=src)
    decode.call("alloc", room=room, n=len(dst), pages=dst)
    decode.call("create", room=room, bootstrap_addr=prefill.info["bootstrap_addr"], prompt_len=prompt_len)
    prefill.call("create", room=room)
    return room


def release_both(prefill: PeerProc, decode: PeerProc, room: int) -> None:
    prefill.release(room)
    decode.release(room)


@pytest.mark.parametrize(
    "groups",
    [[(0, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 3), (3, 4)], [(0, 1), (1, 4)]],
    ids=["one-group", "layer-per-group", "uneven-3-1", "uneven-1-3"],
)
def test_bytes_land_exactly_in_the_right_pages(clean_pair, groups):
    prefill, decode = clean_pair
    src = [3, 4, 5, 9, 10, 20]
    dst = [7, 8, 30, 31, 32, 2]  # different indices, partly contiguous on both sides
    room = setup_room(prefill, decode, src, dst, prompt_len=22)
    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
    for a, b in groups:
        prefill.call("send", room=room, start=a, end=b)
    prefill.call("finish", room=room, prompt_len=22, token=321, logprob=-0.75)
    out = decode.wait_state(room, {"SUCCESS", "FAILED"}, 10)
    assert out["state"] == "SUCCESS", out
    assert out["aux"] == [room, 22, 321, -0.75]
    assert prefill.wait_state(room, {"SUCCESS"}, 5)["state"] == "SUCCESS"
    assert decode.call("hash", pages=dst)["hashes"] == prefill.call("hash", pages=src)["hashes"]
    # pages nobody wrote are still zero
    others = [p for p in range(64) if p not in dst][:8]
    zero = decode.call("hash", pages=[others[0]])["hashes"][0][0]
    assert all(h == zero for region in decode.call("hash", pages=others)["hashes"] for h in region)
    release_both(prefill, decode, room)


def test_worker_waits_for_the_event_before_reading_pages(clean_pair):
    prefill, decode = clean_pair
    src, dst = [11, 12], [40, 41]
    room = setup_room(prefill, decode, src, dst, prompt_len=8)
    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
    before = decode.call("hash", pages=dst)["hashes"]
    event = f"ev-{room}"
    prefill.call("send", room=room, start=0, end=LAYERS, event=event)
    prefill.call("finish", room=room, prompt_len=8, token=1, logprob=0.0)
    time.sleep(0.5)
    # nothing may have moved: the "compute" behind the event is still writing the pages
    assert decode.call("hash", pages=dst)["hashes"] == before
    assert decode.call("poll", room=room)["state"] == "WAITING_FOR_INPUT"
    prefill.call("scribble", pages=src, seed=room)  # the compute's final values
    prefill.call("complete", event=event)
    assert decode.wait_state(room, {"SUCCESS", "FAILED"}, 10)["state"] == "SUCCESS"
    assert decode.call("hash", pages=dst)["hashes"] == prefill.call("hash", pages=src)["hashes"]
    release_both(prefill, decode, room)


def test_malformed_control_messages_are_dropped(clean_pair):
    prefill, decode = clean_pair
    ctx = zmq.Context()
    for endpoint in (decode.info["endpoint"], prefill.call("info")["endpoint"]):
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(endpoint)
        for junk in (b"", b"\xc1\xc1", b"\x93\x01\x02\x03", b"\x81\xa1v\x63"):
            sock.send(junk)
        sock.close()
    ctx.term()
    # both loops survived: a normal transfer still works
    room = setup_room(prefill, decode, [1], [1], prompt_len=3)
    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
    prefill.call("send", room=room, start=0, end=LAYERS)
    prefill.call("finish", room=room, prompt_len=3, token=5, logprob=-1.0)
    assert decode.wait_state(room, {"SUCCESS", "FAILED"}, 10)["state"] == "SUCCESS"
    release_both(prefill, decode, room)


def test_duplicate_room_is_rejected(clean_pair):
    prefill, decode = clean_pair
    # started first: its start-up must not eat into the room's timeouts
    other = PeerProc(role="decode", backend=prefill_backend(prefill), timeouts=TIMEOUTS, num_layers=LAYERS)
    try:
        room = setup_room(prefill, decode, [2], [2], prompt_len=4)
        with pytest.raises(RuntimeError, match=r"DuplicateRoomError: bootstrap_room .* in flight on this prefill"):
            prefill.call("create", room=room)
        with pytest.raises(RuntimeError, match=r"DuplicateRoomError: bootstrap_room .* in flight on this decode"):
            decode.call("create", room=room, bootstrap_addr=prefill.info["bootstrap_addr"], prompt_len=4)
        prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
        # a second decode claiming the same live room is refused by prefill; the first is unaffected
        other.call("alloc", room=room, n=1, pages=[5])
        other.call("create", room=room, bootstrap_addr=prefill.info["bootstrap_addr"], prompt_len=4)
        out = other.wait_state(room, {"FAILED"}, 10)
        assert "duplicate bootstrap_room" in out["error"]
        other.release(room)
        other.assert_clean()
    finally:
        other.close()
    prefill.call("send", room=room, start=0, end=LAYERS)
    prefill.call("finish", room=room, prompt_len=4, token=9, logprob=-2.0)
    assert decode.wait_state(room, {"SUCCESS", "FAILED"}, 10)["state"] == "SUCCESS"
    release_both(prefill, decode, room)


def test_decode_refuses_a_prefill_with_another_layout(clean_pair):
    prefill, _ = clean_pair
    other = PeerProc(role="decode", backend=prefill_backend(prefill), timeouts=TIMEOUTS, num_layers=LAYERS, page_size=8)
    try:
        room = next(_rooms)
        other.call("alloc", room=room, n=1)
        other.call("create", room=room, bootstrap_addr=prefill.info["bootstrap_addr"], prompt_len=1)
        out = other.wait_state(room, {"FAILED"}, 5)
        assert "incompatible KV layout (page_size: prefill 4 vs decode 8)" in out["error"]
        assert out["reason"] == "failed"
        other.release(room)
        other.assert_clean()
    finally:
        other.close()


def prefill_backend(proc: PeerProc) -> str:
    return proc.proc.args[2].split('"backend": "')[1].split('"')[0]


@pytest.mark.parametrize("when", ["waiting", "mid-transfer"])
def test_abort_from_decode_reaches_prefill(clean_pair, when):
    prefill, decode = clean_pair
    room = setup_room(prefill, decode, [6, 7], [6, 7], prompt_len=5)
    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
    if when == "mid-transfer":
        prefill.call("send", room=room, start=0, end=2)
        prefill.call("send", room=room, start=2, end=LAYERS, event=f"hold-{room}")
        decode.wait_state(room, {"TRANSFERRING"}, 10)
    decode.call("abort", room=room)
    out = prefill.wait_state(room, {"FAILED"}, 10)
    assert "aborted by decode" in out["error"]
    assert out["reason"] == "aborted"
    if when == "mid-transfer":
        prefill.call("complete", event=f"hold-{room}")
    decode.wait_safe(room, 5)  # prefill acknowledged once its writes drained
    release_both(prefill, decode, room)


def test_abort_from_prefill_reaches_decode(clean_pair):
    prefill, decode = clean_pair
    room = setup_room(prefill, decode, [8], [9], prompt_len=2)
    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
    prefill.call("send", room=room, start=0, end=1)
    prefill.call("abort", room=room)
    out = decode.wait_state(room, {"FAILED"}, 5)
    assert "aborted by prefill" in out["error"] and out["reason"] == "aborted"
    assert out["safe"]  # prefill aborts only after its writes drained
    release_both(prefill, decode, room)


def test_a_room_ended_on_prefill_before_decode_asked_fails_decode_at_once(clean_pair):
    """The request failed (or was aborted) on prefill before decode's info came: the late info is answered
    FAILED at once, not left waiting for decode's own deadline."""
    prefill, decode = clean_pair
    room = next(_rooms)
    prefill.call("alloc", room=room, n=1, pages=[12])
    prefill.call("create", room=room)
    prefill.call("abort", room=room)
    prefill.release(room)
    decode.call("alloc", room=room, n=1, pages=[13])
    t0 = time.monotonic()
    decode.call("create", room=room, bootstrap_addr=prefill.info["bootstrap_addr"], prompt_len=2)
    out = decode.wait_state(room, {"FAILED", "SUCCESS"}, TIMEOUTS["waiting_for_input"] + 3)
    assert out["state"] == "FAILED" and "ended before decode asked" in out["error"], out
    assert time.monotonic() - t0 < TIMEOUTS["waiting_for_input"] / 2, "decode waited for its deadline"
    assert out["safe"]
    decode.release(room)


def test_prefill_bootstrap_timeout(clean_pair):
    prefill, _ = clean_pair
    room = next(_rooms)
    prefill.call("alloc", room=room, n=1)
    prefill.call("create", room=room)  # no decode ever sends transfer info
    t0 = time.monotonic()
    out = prefill.wait_state(room, {"FAILED"}, TIMEOUTS["bootstrap"] + 3)
    assert "timed out in BOOTSTRAPPING" in out["error"] and out["reason"] == "timed_out"
    assert time.monotonic() - t0 <= TIMEOUTS["bootstrap"] + 2
    prefill.release(room)


def test_decode_bootstrap_timeout_on_unreachable_prefill(clean_pair):
    _, decode = clean_pair
    room = next(_rooms)
    decode.call("alloc", room=room, n=1)
    decode.call("create", room=room, bootstrap_addr="127.0.0.1:1", prompt_len=1)
    t0 = time.monotonic()
    out = decode.wait_state(room, {"FAILED"}, TIMEOUTS["bootstrap"] + 3)
    # the heartbeat gives up on an unreachable prefill before the bootstrap timeout would
    assert "127.0.0.1:1 unreachable" in out["error"] and out["reason"] == "failed"
    assert time.monotonic() - t0 <= TIMEOUTS["bootstrap"] + 1
    assert out["safe"]
    decode.release(room)


def test_waiting_for_input_timeout(clean_pair):
    prefill, decode = clean_pair
    room = setup_room(prefill, decode, [13], [13], prompt_len=1)
    # prefill never runs the forward: both sides time out in WAITING_FOR_INPUT
    for side in (decode, prefill):
        out = side.wait_state(room, {"FAILED"}, TIMEOUTS["waiting_for_input"] + 5)
        assert "WAITING_FOR_INPUT" in out["error"] or "aborted by decode" in out["error"]
    release_both(prefill, decode, room)


def test_transferring_timeout(clean_pair):
    prefill, decode = clean_pair
    room = setup_room(prefill, decode, [14, 15], [14, 15], prompt_len=6)
    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
    prefill.call("send", room=room, start=0, end=1)  # then the prefill stalls: no more groups, no finish
    decode.wait_state(room, {"TRANSFERRING"}, 10)
    out = decode.wait_state(room, {"FAILED"}, TIMEOUTS["transferring"] + 5)
    assert "timed out in TRANSFERRING" in out["error"]
    # whichever side's deadline fired first, decode counts a timeout (prefill's Status carries the reason)
    assert out["reason"] == "timed_out"
    assert prefill.wait_state(room, {"FAILED"}, 5)["state"] == "FAILED"
    release_both(prefill, decode, room)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_killed_mid_transfer(backend):
    prefill, decode = start_pair(backend)
    try:
        room = setup_room(prefill, decode, [1, 2, 3], [4, 5, 6], prompt_len=10)
        prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
        prefill.call("send", room=room, start=0, end=2)
        prefill.call("send", room=room, start=2, end=LAYERS, event="never")
        decode.wait_state(room, {"TRANSFERRING"}, 10)
        prefill.kill()
        t0 = time.monotonic()
        out = decode.wait_state(room, {"FAILED"}, 5)
        assert "lost connection with prefill" in out["error"] and out["reason"] == "failed"
        assert time.monotonic() - t0 < 3  # heartbeat: 2 misses of 0.2 s, plus slack
        decode.release(room, timeout=1)
        decode.assert_clean()
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_killed_mid_transfer(backend):
    prefill, decode = start_pair(backend)
    try:
        room = setup_room(prefill, decode, [1, 2, 3], [4, 5, 6], prompt_len=10)
        prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
        prefill.call("send", room=room, start=0, end=2)
        prefill.call("send", room=room, start=2, end=LAYERS, event="later")
        decode.wait_state(room, {"TRANSFERRING"}, 10)
        decode.kill()
        prefill.call("complete", event="later")  # the next group's writes go to a dead peer
        prefill.call("finish", room=room, prompt_len=10, token=1, logprob=0.0)
        out = prefill.wait_state(room, {"FAILED", "SUCCESS"}, TIMEOUTS["transferring"] + 35)
        assert out["state"] == "FAILED", out
        prefill.release(room, timeout=TIMEOUTS["abort_ack"] + 35)
        prefill.assert_clean()
    finally:
        prefill.close()
        decode.close()
