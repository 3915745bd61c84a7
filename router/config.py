"""Router configuration: which prefill and decode servers exist, how to pick among them, and the limits.

Kept free of FastAPI/httpx imports so the project's CLI can build a config without paying for the HTTP stack.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from contracts.http import DEFAULT_MAX_BODY_BYTES

POLICIES = ("round_robin", "random", "least_load", "cache_aware")

# Conditional disaggregation (issue 13 item 4): a request whose every prompt has at most this many tokens is prefilled
# by the decode server itself, skipping the prefill hop and the KV transfer. Chosen with `bench/serve.py --local-sweep`
# (builtin:tiny-llama, mooncake, router + servers + client on one 2-core CPU host; ratios local/remote, per-round
# medians). Concurrency 1, TTFT p50: 0.60 at 16 tokens, 0.65 at 64, 0.69 at 256, 0.77 at 1024, 0.85 at 2048 -- local
# wins at every length (the saved hop and transfer are a fixed cost; both sides run the same prefill), so TTFT alone
# finds no crossover. Concurrency 8: TTFT p50 0.07-0.20 at 512..2048, but the decode batch pays for the prefills it now
# runs: ITL p50 +10% at 512, +12% at 1024, +83% at 2048. 1024 is the largest measured length where local wins TTFT
# without a large cost to the requests already decoding. Re-measure on the deployment's hardware (GPU prefill is far
# cheaper relative to the hop) and set --local-prefill-max-tokens there.
DEFAULT_LOCAL_PREFILL_MAX_TOKENS = 1024
LOCAL_PREFILL_ENV = "PDSERVE_LOCAL_PREFILL_MAX_TOKENS"
TOKENIZER_ENV = "PDSERVE_TOKENIZER"

# Cache-aware routing (`--policy cache_aware`, router/cache_aware.py): follow the prefix when more than this fraction of
# the prompt's characters was last sent to one prefill...
DEFAULT_CACHE_THRESHOLD = 0.5
# ...unless the prefills' in-flight counts differ by more than ABS requests AND the busiest has more than REL times the
# idlest's: then the least loaded one, so one hot prefix cannot pin one server while another idles.
DEFAULT_BALANCE_ABS_THRESHOLD = 32
DEFAULT_BALANCE_REL_THRESHOLD = 1.5
# Characters of routed prompts remembered per prefill (~4 characters a token: about a million tokens, the order of a
# large GPU prefix cache); least recently used prefixes are forgotten first, as the server's own cache forgets them.
DEFAULT_MAX_TREE_CHARS = 1 << 22
# name -> (flag, environment twin)
CACHE_AWARE_FLAGS = {
    "cache_threshold": ("--cache-threshold", "PDSERVE_CACHE_THRESHOLD"),
    "balance_abs_threshold": ("--balance-abs-threshold", "PDSERVE_BALANCE_ABS_THRESHOLD"),
    "balance_rel_threshold": ("--balance-rel-threshold", "PDSERVE_BALANCE_REL_THRESHOLD"),
    "max_tree_chars": ("--max-tree-chars", "PDSERVE_MAX_TREE_CHARS"),
}


class RouterConfigError(ValueError):
    """A router setting is invalid; the message says which one and why."""


class PrefillServer(NamedTuple):
    """One prefill server: its HTTP URL and the port of its KV bootstrap server (None: the server's default).
    A NamedTuple, so it is also the plain (url, bootstrap_port) pair callers may pass in."""

    url: str
    bootstrap_port: int | None = None

    @property
    def host(self) -> str:
        """The host decode servers reach P's bootstrap server at: the URL's hostname (IPv6 brackets stripped)."""
        return urlsplit(self.url).hostname or ""


def normalize_url(url: str, what: str) -> str:
    """Checks that `url` is an absolute http(s) URL with a host and no query, and drops any trailing slash so
    that paths can be appended with a plain `+`."""
    if not isinstance(url, str) or not url.strip():
        raise RouterConfigError(f"{what}: URL must be a non-empty string, got {url!r}")
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RouterConfigError(f"{what}: URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise RouterConfigError(f"{what}: URL {url!r} has no host")
    try:
        parts.port  # noqa: B018 - urlsplit only validates the port when it is read
    except ValueError as e:
        raise RouterConfigError(f"{what}: URL {url!r} has an invalid port ({e})") from None
    if parts.query or parts.fragment:
        raise RouterConfigError(f"{what}: URL {url!r} must not carry a query or fragment")
    return url.rstrip("/")


def _bootstrap_port(value: object, what: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise RouterConfigError(f"{what}: bootstrap port must be an integer or none, got {value!r}")
    try:
        port = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise RouterConfigError(f"{what}: bootstrap port must be an integer or none, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise RouterConfigError(f"{what}: bootstrap port {port} is outside 1..65535")
    return port


def _prefill_entry(entry: object, i: int) -> PrefillServer:
    what = f"prefill[{i}]"
    if isinstance(entry, PrefillServer):
        return PrefillServer(normalize_url(entry.url, what), _bootstrap_port(entry.bootstrap_port, what))
    if isinstance(entry, str):
        return PrefillServer(normalize_url(entry, what), None)
    if isinstance(entry, Sequence) and 1 <= len(entry) <= 2:
        port = entry[1] if len(entry) == 2 else None
        return PrefillServer(normalize_url(entry[0], what), _bootstrap_port(port, what))
    raise RouterConfigError(f"{what}: expected (url, bootstrap_port | None) or a URL, got {entry!r}")


@dataclass
class RouterConfig:
    """Everything the router needs. `prefill` entries may be given as (url, port | None) tuples, bare URLs or
    PrefillServer; they are normalized to PrefillServer on construction."""

    prefill: list[PrefillServer] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    policy: str = "round_robin"
    api_key: str | None = None
    request_timeout_s: float = 600.0
    max_retries: int = 3
    # 0 disables the periodic health loop; a server marked down by a failed request is still probed until it answers.
    health_check_interval_s: float = 5.0
    host: str = "127.0.0.1"
    port: int = 8000
    # Short on purpose: a refused or black-holed connection should move on to another pair quickly.
    connect_timeout_s: float = 5.0
    # A larger request body gets 413 (checked on Content-Length, then as it arrives); the servers share the default.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Prompts of at most this many tokens are prefilled on the decode server (0: always on a prefill server). Takes
    # effect only with `tokenizer`: the router counts tokens exactly as the servers do, or not at all.
    local_prefill_max_tokens: int = DEFAULT_LOCAL_PREFILL_MAX_TOKENS
    tokenizer: str | None = None  # a Hugging Face model/tokenizer directory (the servers' --model)
    # policy "cache_aware" only (see the DEFAULT_* above)
    cache_threshold: float = DEFAULT_CACHE_THRESHOLD
    balance_abs_threshold: int = DEFAULT_BALANCE_ABS_THRESHOLD
    balance_rel_threshold: float = DEFAULT_BALANCE_REL_THRESHOLD
    max_tree_chars: int = DEFAULT_MAX_TREE_CHARS

    def __post_init__(self) -> None:
        if isinstance(self.prefill, (str, PrefillServer)) or not isinstance(self.prefill, Sequence):
            raise RouterConfigError("prefill must be a list of (url, bootstrap_port | None)")
        if isinstance(self.decode, str) or not isinstance(self.decode, Sequence):
            raise RouterConfigError("decode must be a list of URLs")
        self.prefill = [_prefill_entry(e, i) for i, e in enumerate(self.prefill)]
        self.decode = [normalize_url(u, f"decode[{i}]") for i, u in enumerate(self.decode)]
        self._check_servers()
        self._check_settings()

    def _check_servers(self) -> None:
        if not self.prefill:
            raise RouterConfigError("at least one prefill server is required (--prefill URL [BOOTSTRAP_PORT])")
        if not self.decode:
            raise RouterConfigError("at least one decode server is required (--decode URL)")
        for role, urls in (("prefill", [p.url for p in self.prefill]), ("decode", self.decode)):
            dup = sorted({u for u in urls if urls.count(u) > 1})
            if dup:
                raise RouterConfigError(f"{role} server listed more than once: {', '.join(dup)}")
        both = sorted({p.url for p in self.prefill} & set(self.decode))
        if both:
            raise RouterConfigError(f"a server cannot be both prefill and decode: {', '.join(both)}")

    def _check_settings(self) -> None:
        if self.policy not in POLICIES:
            raise RouterConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise RouterConfigError("api_key must be a non-empty string (leave it unset to disable auth)")
        _positive("request_timeout_s", self.request_timeout_s)
        _positive("connect_timeout_s", self.connect_timeout_s)
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise RouterConfigError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise RouterConfigError(f"max_body_bytes must be an integer >= 1, got {self.max_body_bytes!r}")
        if not _is_number(self.health_check_interval_s) or self.health_check_interval_s < 0:
            raise RouterConfigError(
                f"health_check_interval_s must be >= 0 (0 disables health checks), got {self.health_check_interval_s!r}"
            )
        self._check_local_prefill()
        for name, (flag, env) in CACHE_AWARE_FLAGS.items():
            problem = cache_aware_problem(name, getattr(self, name))
            if problem:
                raise RouterConfigError(f"{name} ({flag}, ${env}) {problem}")
        if not isinstance(self.host, str) or not self.host:
            raise RouterConfigError(f"host must be a non-empty string, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise RouterConfigError(f"port must be an integer in 0..65535, got {self.port!r}")

    def _check_local_prefill(self) -> None:
        n = self.local_prefill_max_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise RouterConfigError(
                f"local_prefill_max_tokens (--local-prefill-max-tokens, ${LOCAL_PREFILL_ENV}) must be an integer >= 0 "
                f"(0 sends every request to a prefill server), got {n!r}"
            )
        if self.tokenizer is None:
            return
        if not isinstance(self.tokenizer, str) or not self.tokenizer.strip():
            raise RouterConfigError(
                f"tokenizer (--tokenizer, ${TOKENIZER_ENV}) must be a directory path or unset, got {self.tokenizer!r}"
            )
        if not os.path.isdir(self.tokenizer):
            raise RouterConfigError(
                f"tokenizer (--tokenizer, ${TOKENIZER_ENV}): {self.tokenizer!r} is not a directory; pass the Hugging "
                "Face model directory the servers load (their --model), or leave it unset to send every request to a "
                "prefill server"
            )

    @property
    def local_prefill(self) -> bool:
        """Whether short requests may be prefilled on the decode server (a threshold and a tokenizer to count with)."""
        return self.local_prefill_max_tokens > 0 and self.tokenizer is not None


def cache_aware_problem(name: str, v: object) -> str | None:
    """What is wrong with the cache-aware setting `name` = `v` (None: nothing), for RouterConfig and argparse alike."""
    if name == "cache_threshold":
        ok = _is_number(v) and 0 <= v <= 1  # type: ignore[operator]
        return None if ok else f"must be a number in 0..1 (the share of the prompt a prefill must hold), got {v!r}"
    if name == "balance_rel_threshold":
        ok = _is_number(v) and v >= 1  # type: ignore[operator]
        return None if ok else f"must be a number >= 1 (busiest load / idlest load), got {v!r}"
    least = 0 if name == "balance_abs_threshold" else 1
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= least
    return None if ok else f"must be an integer >= {least}, got {v!r}"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(name: str, v: object) -> None:
    if not _is_number(v) or not v > 0:  # type: ignore[operator]
        raise RouterConfigError(f"{name} must be a number > 0, got {v!r}")


# ---- command line (shared by `python -m router` and `pdserve router`) ----

API_KEY_ENV = "PDSERVE_API_KEY"


def add_router_args(parser: argparse.ArgumentParser) -> None:
    d = RouterConfig.__dataclass_fields__
    parser.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        default=[],
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="a prefill server and, optionally, its bootstrap port ('none' or absent: the server's default); "
        "repeat for several",
    )
    parser.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode server; repeatable")
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default=d["policy"].default,
        help="how P and D are picked (cache_aware: the prefill by shared prompt prefix and load, the decode by load)",
    )
    parser.add_argument("--host", default=d["host"].default)
    parser.add_argument("--port", type=int, default=d["port"].default)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on API routes (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--request-timeout",
        "--request-timeout-secs",
        dest="request_timeout",
        type=float,
        default=d["request_timeout_s"].default,
        help="seconds a request may take end to end",
    )
    parser.add_argument(
        "--max-retries",
        "--retry-max-retries",
        dest="max_retries",
        type=int,
        default=d["max_retries"].default,
        help="new pairs to try after a connection failure",
    )
    parser.add_argument(
        "--health-check-interval",
        "--health-check-interval-secs",
        dest="health_check_interval",
        type=float,
        default=d["health_check_interval_s"].default,
        help="seconds between /health probes of every server (0: off; a server a request found down is still probed "
        "until it answers)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=d["max_body_bytes"].default,
        help="largest request body accepted, in bytes; larger ones get 413",
    )
    parser.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        # a string default goes through `type` too, so a bad environment value is an argparse error naming the flag
        default=os.environ.get(LOCAL_PREFILL_ENV) or str(d["local_prefill_max_tokens"].default),
        metavar="N",
        help="conditional disaggregation: a request whose every prompt has at most N tokens is prefilled on the "
        "decode server itself (no prefill hop, no KV transfer); 0: always on a prefill server; needs --tokenizer "
        f"(default: ${LOCAL_PREFILL_ENV}, else %(default)s)",
    )
    parser.add_argument(
        "--tokenizer",
        default=os.environ.get(TOKENIZER_ENV) or None,
        metavar="DIR",
        help="Hugging Face model/tokenizer directory the router counts prompt tokens with, by the servers' rules "
        f"(pdserve launch passes the model's); without it every request goes to a prefill server "
        f"(default: ${TOKENIZER_ENV})",
    )
    add_cache_aware_args(parser)
    parser.add_argument(
        "--pd-disaggregation", action="store_true", help="accepted for sglang-router compatibility (always on)"
    )


def _checked(name: str, convert: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type for a cache-aware knob: a bad value is refused by the parser, naming the flag, so `pdserve
    launch` refuses it before starting anything (it runs each daemon's parser first)."""

    def parse(text: str) -> int | float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {convert.__name__}, got {text!r}") from None
        problem = cache_aware_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def add_cache_aware_args(parser: argparse.ArgumentParser) -> None:
    helps = {
        "cache_threshold": (float, "follow a prompt's prefix to the prefill that last received it when more than "
                            "this share of its characters matched"),
        "balance_abs_threshold": (int, "...unless the prefills' in-flight requests differ by more than this"),
        "balance_rel_threshold": (float, "...and the busiest has more than this many times the idlest's: then the "
                                  "least loaded prefill"),
        "max_tree_chars": (int, "characters of routed prompts remembered per prefill (least recently used forgotten)"),
    }  # fmt: skip
    defaults = RouterConfig.__dataclass_fields__
    g = parser.add_argument_group("--policy cache_aware")
    for name, (convert, text) in helps.items():
        flag, env = CACHE_AWARE_FLAGS[name]
        g.add_argument(
            flag,
            type=_checked(name, convert),
            # a string default goes through `type` too: a bad environment value is an error naming the flag
            default=os.environ.get(env) or str(defaults[name].default),
            metavar="N",
            help=f"{text} (default: ${env}, else %(default)s)",
        )


def router_config(args: argparse.Namespace) -> RouterConfig:
    """Builds the config from parsed args; raises RouterConfigError with a readable message."""
    prefill: list[tuple[str, str | None]] = []
    for entry in args.prefill:
        if len(entry) > 2:
            raise RouterConfigError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(entry)}")
        prefill.append((entry[0], entry[1] if len(entry) == 2 else None))
    return RouterConfig(
        prefill=prefill,  # type: ignore[arg-type]  # normalized by RouterConfig
        decode=list(args.decode),
        policy=args.policy,
        api_key=args.api_key,
        request_timeout_s=args.request_timeout,
        max_retries=args.max_retries,
        health_check_interval_s=args.health_check_interval,
        max_body_bytes=args.max_body_bytes,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        tokenizer=args.tokenizer,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        max_tree_chars=args.max_tree_chars,
        host=args.host,
        port=args.port,
    )
