"""The bootstrap server (prefill side, DESIGN §3.2) and decode's client for it.

Each prefill rank registers its control endpoint, KV layout and instance id with `PUT /route`; decode asks
`GET /route` once per prefill for the layout (503 until every rank registered: `tp_size` ranks) and
`GET /route?tp_rank=R` for each rank's endpoint and instance (every decode rank registers with every prefill
rank). The layout is the model's KV geometry plus the prefill's TP size; a decode of another TP size is served
when both sizes divide, or are multiples of, the model's KV heads (transfer/head_map.py). `GET /health` is
decode's heartbeat target; it answers every rank's endpoint and instance, so the heartbeat sees a restarted rank
(a new instance id).
A small stdlib HTTP server in a daemon thread is enough: a handful of calls per prefill/decode pair.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import httpx

from contracts.pd import DEFAULT_BOOTSTRAP_PORT, dp_owner
from engine.kvcache import KVLayout
from transfer.head_map import describe_tp, tp_pair_problem

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BOOTSTRAP_PORT",
    "LAYOUT_FIELDS",
    "BootstrapError",
    "BootstrapServer",
    "LayoutMismatch",
    "Probe",
    "RankInfo",
    "check_layout",
    "fetch_route",
    "health",
    "probe",
    "register_rank",
]


class BootstrapError(RuntimeError):
    pass


class LayoutMismatch(BootstrapError):
    pass


@dataclass
class RankInfo:
    """One prefill rank as `PUT /route` registers it; its fields are the JSON body, unchanged on the wire.

    Build it with `of()` from the pool's KVLayout: the layout fields come from `KVLayout.wire()`, the one
    definition of what both sides compare, and decode derives its own side of the comparison the same way.
    """

    tp_size: int
    tp_rank: int
    rank_ip: str
    rank_port: int
    page_size: int
    kv_dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    backend: str
    instance: str = ""  # the rank's transfer manager instance id: changes with every start
    # DP attention: the ranks are data-parallel, and room R is written whole by rank R % dp_size (TransferConfig)
    dp_size: int = 1

    @classmethod
    def of(
        cls,
        kv: KVLayout,
        backend: str,
        tp_size: int,
        tp_rank: int,
        rank_ip: str,
        rank_port: int,
        instance: str = "",
        dp_size: int = 1,
    ) -> RankInfo:
        return cls(
            tp_size=tp_size,
            tp_rank=tp_rank,
            dp_size=dp_size,
            rank_ip=rank_ip,
            rank_port=rank_port,
            backend=backend,
            instance=instance,
            **kv.wire(),
        )

    def where(self) -> dict:
        """What `GET /route?tp_rank=R` and `/health` answer for the rank: its endpoint and instance."""
        return {"rank_ip": self.rank_ip, "rank_port": self.rank_port, "instance": self.instance}

    def layout(self) -> dict:
        """What `GET /route` answers and `check_layout` compares: the TP (and DP) size and LAYOUT_FIELDS."""
        return {"tp_size": self.tp_size, "dp_size": self.dp_size, **{k: getattr(self, k) for k in LAYOUT_FIELDS}}


# What decode must agree on with prefill before any byte moves: every field of a rank that is not about
# where the rank is (the model's KV geometry, as KVLayout.wire() names it, and the transfer engine). TP sizes may
# differ; whether a pair of them can be served is `transfer.head_map.tp_pair_problem`'s question.
_WHERE = ("tp_size", "tp_rank", "rank_ip", "rank_port", "instance", "dp_size")
LAYOUT_FIELDS = tuple(f.name for f in fields(RankInfo) if f.name not in _WHERE)


class BootstrapServer:
    def __init__(self, host: str = "0.0.0.0", port: int = DEFAULT_BOOTSTRAP_PORT) -> None:
        self._ranks: dict[int, RankInfo] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bootstrap-http", daemon=True)

    def start(self) -> BootstrapServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("bootstrap: " + fmt, *args)

            def _reply(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path == "/health":
                    return self._reply(200, {"status": "ok", "ranks": server.ranks()})
                if url.path != "/route":
                    return self._reply(404, {"error": f"no route {url.path}"})
                query = parse_qs(url.query)
                code, body = server.lookup(query.get("tp_rank", [None])[0])
                return self._reply(code, body)

            def do_PUT(self) -> None:
                if urlparse(self.path).path != "/route":
                    return self._reply(404, {"error": f"no route {self.path}"})
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    info = RankInfo(**json.loads(self.rfile.read(length)))
                except (ValueError, TypeError) as e:
                    return self._reply(400, {"error": f"bad registration: {e}"})
                server.register(info)
                return self._reply(200, {"status": "registered"})

        return Handler

    def register(self, info: RankInfo) -> None:
        with self._lock:
            self._ranks[info.tp_rank] = info
        log.info("bootstrap: prefill rank %d/%d at %s:%d", info.tp_rank, info.tp_size, info.rank_ip, info.rank_port)

    def ranks(self) -> dict[str, dict]:
        """Every registered rank's endpoint and instance, keyed by its rank (a JSON key, so a string)."""
        with self._lock:
            return {str(rank): info.where() for rank, info in self._ranks.items()}

    def lookup(self, tp_rank: str | None) -> tuple[int, dict]:
        with self._lock:
            ranks = dict(self._ranks)
        if not ranks:
            return 503, {"error": "no prefill rank registered yet"}
        tp_size = next(iter(ranks.values())).tp_size
        if tp_rank is None:
            if len(ranks) < tp_size:
                return 503, {"error": f"{len(ranks)} of {tp_size} prefill ranks registered"}
            return 200, ranks[min(ranks)].layout()
        try:
            rank = int(tp_rank)
        except ValueError:
            return 400, {"error": f"tp_rank must be an integer, got {tp_rank!r}"}
        if rank not in ranks:
            return 404, {"error": f"unknown prefill rank {rank}"}
        return 200, ranks[rank].where()


def register_rank(bootstrap_addr: str, info: RankInfo, timeout: float = 5.0, attempts: int = 10) -> None:
    """PUT this rank's info, retrying with backoff while the server starts (~30 s in all: under tensor parallelism
    ranks other than 0 register at rank 0's server, which may come up after them)."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            r = httpx.put(f"http://{bootstrap_addr}/route", json=asdict(info), timeout=timeout)
            r.raise_for_status()
            return
        except httpx.HTTPError as e:
            if attempt == attempts - 1:
                raise BootstrapError(f"cannot register with bootstrap server {bootstrap_addr}: {e}") from e
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def fetch_route(bootstrap_addr: str, tp_rank: int | None = None, timeout: float = 5.0) -> dict:
    params = {} if tp_rank is None else {"tp_rank": tp_rank}
    try:
        r = httpx.get(f"http://{bootstrap_addr}/route", params=params, timeout=timeout)
    except httpx.HTTPError as e:
        raise BootstrapError(f"prefill bootstrap server {bootstrap_addr} unreachable: {e}") from e
    if r.status_code != 200:
        raise BootstrapError(f"prefill bootstrap server {bootstrap_addr} answered {r.status_code}: {r.text}")
    return r.json()


def check_layout(local: dict, remote: dict, bootstrap_addr: str) -> None:
    """Refuse a prefill whose KV geometry differs (naming every field that does), or whose TP layout cannot fill
    this decode's (naming both layouts). `local`/`remote`: `RankInfo.layout()` of decode and prefill."""
    writers = writer_ranks(remote)
    both = (
        f"prefill {describe_tp(remote.get('num_kv_heads'), writers)} vs "
        f"decode {describe_tp(local['num_kv_heads'], local['tp_size'])}"
    )
    diffs = [
        f"{k}: prefill {remote.get(k)!r} vs decode {local[k]!r}" for k in LAYOUT_FIELDS if remote.get(k) != local[k]
    ]
    if diffs:
        raise LayoutMismatch(f"prefill at {bootstrap_addr} has an incompatible KV layout ({'; '.join(diffs)}); {both}")
    problem = tp_pair_problem(local["num_kv_heads"], writers, local["tp_size"])
    if problem:
        raise LayoutMismatch(f"prefill at {bootstrap_addr} cannot serve this decode's TP layout ({both}): {problem}")


def writer_ranks(layout: dict) -> int:
    """How many prefill ranks write each room, from its `GET /route` layout: all TP ranks, or one under DP attention."""
    return 1 if int(layout.get("dp_size", 1)) > 1 else layout.get("tp_size", 0)


def room_writers(room: int, tp_size: int, dp_size: int) -> list[int]:
    """The prefill ranks that write room `room`: every rank, or under DP attention its owner alone."""
    return [dp_owner(room, "", dp_size)] if dp_size > 1 else list(range(tp_size))


def health(bootstrap_addr: str, timeout: float = 2.0) -> bool:
    return probe(bootstrap_addr, timeout).ok


@dataclass
class Probe:
    """One heartbeat: `ok` with the ranks' endpoints and instances, or why not.

    `gone` (nothing listens there, or the host cannot be reached) and `frozen` (a TCP connection was accepted
    but no answer came: the process exists and is stopped or stuck) matter apart: a frozen prefill may still
    write into decode's pages once it runs again, a gone one cannot.
    """

    ok: bool
    ranks: dict[int, dict]
    gone: bool = False
    frozen: bool = False
    error: str = ""


def probe(bootstrap_addr: str, timeout: float = 2.0) -> Probe:
    try:
        r = httpx.get(f"http://{bootstrap_addr}/health", timeout=timeout)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        return Probe(False, {}, gone=True, error=f"cannot connect: {e}")
    except httpx.TimeoutException as e:
        return Probe(False, {}, frozen=True, error=f"no answer in {timeout}s: {e}")
    except httpx.HTTPError as e:
        return Probe(False, {}, error=str(e))
    if r.status_code != 200:
        return Probe(False, {}, error=f"answered {r.status_code}")
    try:
        ranks = {int(k): v for k, v in r.json().get("ranks", {}).items()}
    except (ValueError, AttributeError) as e:
        return Probe(False, {}, error=f"bad /health answer: {e}")
    return Probe(True, ranks)
