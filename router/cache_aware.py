"""`--policy cache_aware`: send a prompt to the prefill server most likely to hold its prefix in its prefix cache,
unless that would pile work on one server while another idles (the approach of SGLang's router, written anew).

The router remembers what text it sent where, in an approximate per-server radix tree (`router.prefix_tree`); a
request's routing text (`routing_key`) is matched against it among the servers that may take this attempt. In order:

1. "balance": the prefills' loads differ by more than `balance_abs_threshold` requests AND the busiest has more than
   `balance_rel_threshold` times the idlest's load: the least loaded one, whatever it holds;
2. "prefix": more than `cache_threshold` of the text's characters were last sent to one or more of them: the least
   loaded of those (the most recent on a tie), so a hot prefix once spilled to a second server is shared by both;
3. "least_load": otherwise the least loaded one, ties to the one remembering the least text (new prefixes spread
   the cache over the servers), then the first configured.

The text is then recorded under the server chosen (a retry records it again under the server it moves to, and a
server that is down or already failed this request is not a candidate, so its stale history never wins). A prefill's
load is the router's own count of requests sent to it that it has not yet answered (`Upstreams.prefill_started`):
immediate and exact for this router, where the polled `/get_load` lags a burst by up to its refresh interval, which
is the very case the balance rule is for. Decode servers have no prefix cache: they go by least load, as
`--policy least_load` picks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from contracts.metrics import CacheRoute
from contracts.pd import Dialect
from router import telemetry
from router.config import (
    DEFAULT_BALANCE_ABS_THRESHOLD,
    DEFAULT_BALANCE_REL_THRESHOLD,
    DEFAULT_CACHE_THRESHOLD,
    DEFAULT_MAX_TREE_CHARS,
    RouterConfig,
)
from router.local_prefill import prompts_of
from router.policies import LeastLoadPolicy, Policy, Role
from router.prefix_tree import PrefixTree

__all__ = ["MAX_KEY_CHARS", "CacheAwarePolicy", "routing_key"]

# Only a prompt's first characters route it: enough to tell long shared documents apart, and the router's work per
# request stays bounded however large the body (up to --max-body-bytes).
MAX_KEY_CHARS = 65536


def _text_of(kind: str, value: Any, limit: int) -> str:
    """A prompt's routing text, cut to about `limit` characters (the rest cannot matter, and costs to build)."""
    if kind == "text":
        return str(value)[:limit]
    if kind == "ids":  # a token-id prompt: its ids as text, so id prompts sharing a prefix share a key prefix
        return "".join(f"{i} " for i in value[:limit])[:limit]  # an id takes at least 2 characters with its space
    # chat: each turn's role and content, as the template lays them out in order (roles included: a system turn and
    # a user turn with the same text are different prompts to the server)
    parts: list[str] = []
    size = 0
    for m in value:
        if size >= limit:
            break
        parts.append(f"{m['role']}\n{m['content'][:limit]}\n")
        size += len(parts[-1])
    return "".join(parts)[:limit]


def routing_key(body: dict[str, Any], dialect: Dialect) -> str | None:
    """The text a request is routed by: its prompt (a batch's prompts one after another), at most MAX_KEY_CHARS
    characters; None for a body the servers would not read as is (it is routed by load, and refused by them)."""
    prompts = prompts_of(body, dialect)
    if prompts is None:
        return None
    parts: list[str] = []
    size = 0
    for kind, value in prompts:
        if size >= MAX_KEY_CHARS:
            break
        parts.append(_text_of(kind, value, MAX_KEY_CHARS - size))
        size += len(parts[-1]) + 1
    return "\n".join(parts)[:MAX_KEY_CHARS] or None


class CacheAwarePolicy(Policy):
    """Prefill by shared prefix and load (the module's rules); decode by least load. `decide` is the pure part;
    `choose` also records the text under the server chosen and counts the decision."""

    name = "cache_aware"
    needs_loads = True  # for the decode side: the polled /get_load, as least_load
    needs_key = True
    inflight_prefill = True

    def __init__(
        self,
        cache_threshold: float = DEFAULT_CACHE_THRESHOLD,
        balance_abs_threshold: int = DEFAULT_BALANCE_ABS_THRESHOLD,
        balance_rel_threshold: float = DEFAULT_BALANCE_REL_THRESHOLD,
        max_tree_chars: int = DEFAULT_MAX_TREE_CHARS,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.tree = PrefixTree(max_tree_chars)
        self._decode = LeastLoadPolicy()
        self.last_decision: CacheRoute | None = None

    @classmethod
    def from_config(cls, cfg: RouterConfig) -> CacheAwarePolicy:
        return cls(cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold, cfg.max_tree_chars)

    def info(self) -> dict[str, Any]:
        """The knobs, for anything that reports the router's settings."""
        return {
            "policy": self.name,
            "cache_threshold": self.cache_threshold,
            "balance_abs_threshold": self.balance_abs_threshold,
            "balance_rel_threshold": self.balance_rel_threshold,
            "max_tree_chars": self.tree.max_chars,
        }

    def choose(
        self, role: Role, candidates: Sequence[str], loads: Mapping[str, float] | None = None, key: str | None = None
    ) -> str:
        if not candidates:
            raise ValueError(f"no {role} candidates")
        if role == "decode":
            return self._decode.choose(role, candidates, loads)
        url, decision = self.decide(candidates, loads or {}, key)
        if key:
            self.tree.insert(key, url)
        self.last_decision = decision
        telemetry.count_cache_route(decision)
        return url

    def decide(self, candidates: Sequence[str], loads: Mapping[str, float], key: str | None) -> tuple[str, CacheRoute]:
        """The prefill for a request with routing text `key` among `candidates` (their loads: absent is 0), and why."""
        load = {c: float(loads.get(c, 0.0)) for c in candidates}
        if self._imbalanced(load.values()):
            return self._least_loaded(candidates, load), CacheRoute.BALANCE
        if key:
            m = self.tree.match(key, load)
            if m.tenants and m.chars / len(key) > self.cache_threshold:
                return min(m.tenants, key=lambda t: (load[t], -m.tenants[t])), CacheRoute.PREFIX
        return self._least_loaded(candidates, load), CacheRoute.LEAST_LOAD

    def _imbalanced(self, loads: Iterable[float]) -> bool:
        values = list(loads)
        hi, lo = max(values), min(values)
        return hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold

    def _least_loaded(self, candidates: Sequence[str], load: Mapping[str, float]) -> str:
        # min() keeps the first of equals: the configured order breaks the last tie, deterministically
        return min(candidates, key=lambda c: (load[c], self.tree.size(c)))
