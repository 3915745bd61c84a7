"""The prefill manager's per-peer tables stay bounded however many decodes come, restart and go: a real
manager and engine in one process, control messages fed to its handler as its receive loop would."""

from __future__ import annotations

import pytest

pytest.importorskip("mooncake.engine")

import torch

import transfer.prefill as prefill_mod
import transfer.prefill_peers as peers_mod
from engine.kvcache import KVPool
from engine.kvcache.pool import KVLayout
from transfer.config import TransferConfig
from transfer.prefill import PrefillTransferManager
from transfer.protocol import Registration, TransferInfo


def registration(session: str, endpoint: str, pool: KVPool, rpc_port: int) -> Registration:
    n = pool.layout.num_layers
    meta = f"127.0.0.1:{rpc_port}".encode()  # a Mooncake session id nobody listens on: never written to here
    heads = pool.layout.num_kv_heads
    return Registration(session, endpoint, "mooncake", meta, [4096] * n, [8192] * n, pool.layout.head_bytes,
                        (pool.num_pages + 1) * heads, 1 << 20, 64, 4, 0, 1, 0, heads, heads)  # fmt: skip


@pytest.fixture
def prefill(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(peers_mod, "MAX_PEERS", 3)
    monkeypatch.setattr(prefill_mod, "MAX_EARLY", 5)
    pool = KVPool(KVLayout(num_layers=2, page_size=4, num_kv_heads=1, head_dim=4, dtype=torch.float32), 8)
    with PrefillTransferManager(TransferConfig(aux_rows=4), pool) as m:
        yield m


def test_restarted_decodes_replace_their_predecessor_and_idle_peers_are_bounded(prefill: PrefillTransferManager):
    pool = prefill.pool
    for start in range(4):  # one decode endpoint restarted 4 times: one peer, the latest session
        prefill._handle(registration(f"tcp://127.0.0.1:7000#s{start}", "tcp://127.0.0.1:7000", pool, 2))
    assert list(prefill._peers) == ["tcp://127.0.0.1:7000#s3"]
    assert list(prefill.backend._peers) == ["tcp://127.0.0.1:7000#s3"]  # the engine peers of the old ones removed
    for port in range(7001, 7011):  # many decodes (e.g. restarted on new ports): the idle ones are forgotten
        prefill._handle(registration(f"tcp://127.0.0.1:{port}#x", f"tcp://127.0.0.1:{port}", pool, 2))
    assert len(prefill._peers) == 3 and len(prefill.backend._peers) == 3
    assert "tcp://127.0.0.1:7010#x" in prefill._peers


def test_early_infos_are_bounded(prefill: PrefillTransferManager):
    session = "tcp://127.0.0.1:7000#s"
    prefill._handle(registration(session, "tcp://127.0.0.1:7000", prefill.pool, 2))
    for room in range(20):  # infos for requests that never reach this prefill
        prefill._handle(TransferInfo(room, session, "tcp://127.0.0.1:7000", prefill.instance, [1], 0, 4))
    assert list(prefill._early) == [15, 16, 17, 18, 19]
