"""`--policy cache_aware`: the prefix tree (router/prefix_tree.py), the policy's decisions (router/cache_aware.py), its
flags (router/config.py, through `pdserve launch` too), and the router's own in-flight count per prefill against
stand-in servers. Deterministic and fast; the real-process run is tests/test_cache_aware_e2e.py."""

from __future__ import annotations

import argparse
import random
import re
import threading
from typing import Any

import httpx
import pytest

from contracts.metrics import CacheRoute
from router import telemetry
from router.cache_aware import MAX_KEY_CHARS, CacheAwarePolicy, routing_key
from router.config import RouterConfig, RouterConfigError, add_router_args, router_config
from router.policies import make_policy
from router.prefix_tree import PrefixTree, _Node, common_prefix
from tests.test_router import ServerThread, StandIn, dead_url, wait_until

pytestmark = pytest.mark.timeout(60)

DOC_A = "You are a careful assistant. Here is the contract: " + "clause alpha; " * 30
DOC_B = "Translate the following pages into French, keeping terms: " + "beta item, " * 30
DOC_C = "Summarize this log for an on-call engineer please: " + "gamma line\n" * 30


# ---- the tree -------------------------------------------------------------------------------------------


def test_match_finds_the_longest_prefix_among_the_tenants_asked_about() -> None:
    t = PrefixTree(max_chars=1000)
    assert t.match("anything").chars == 0 and t.match("anything").tenants == {}
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    m = t.match("hello wonder")
    assert m.chars == len("hello wo") and set(m.tenants) == {"a"}
    m = t.match("hello ")
    assert m.chars == 6 and set(m.tenants) == {"a", "b"}  # both received "hello "
    assert t.match("hello world, again").chars == len("hello world")
    # only the candidates count: b's history is the best there is when a cannot take the request
    m = t.match("hello world", tenants=["b"])
    assert m.chars == len("hello ") and set(m.tenants) == {"b"}
    assert t.match("hello world", tenants=["c"]).chars == 0
    assert t.match("xyz").chars == 0


def test_shared_prefixes_are_stored_once_per_tenant_and_recency_is_kept() -> None:
    t = PrefixTree(max_chars=1000)
    t.insert("abcdef", "a")
    t.insert("abcxyz", "a")
    t.insert("abcxyz", "b")
    assert t.size("a") == len("abcdef") + len("xyz")  # "abc" counted once
    assert t.size("b") == len("abcxyz") and t.size("nobody") == 0
    assert sorted(t.tenants) == ["a", "b"]
    m = t.match("abcx")
    assert m.tenants["b"] > m.tenants["a"]  # b received it last
    t.insert("abcxyz", "a")
    assert t.match("abcx").tenants["a"] > t.match("abcx").tenants["b"]
    assert t.size("a") == 9  # inserting again adds nothing


def test_eviction_keeps_each_tenant_within_its_bound_dropping_least_recent_first() -> None:
    t = PrefixTree(max_chars=100)
    texts = [f"{i:03d}-" + "x" * 16 for i in range(40)]  # 20 characters each, no shared prefix past the number
    for i, text in enumerate(texts):
        t.insert(text, "a")
        t.insert(texts[0], "a")  # kept recent: never the one evicted
        assert t.size("a") <= 100, i
        if i % 3 == 0:
            t.insert(text, "b")  # another tenant's copies are its own business
    assert t.match(texts[0], ["a"]).chars == 20
    assert t.match(texts[-1], ["a"]).chars == 20  # the newest stays
    assert t.match(texts[1], ["a"]).chars < 20  # an old one went
    assert t.match(texts[39], ["b"]).chars == 20 and t.size("b") <= 100
    assert t.node_count() < 30  # evicted text leaves the tree, not just the counts
    _check_invariants(t)


def test_a_text_longer_than_the_bound_cannot_grow_the_tree_past_it() -> None:
    t = PrefixTree(max_chars=50)
    t.insert("q" * 500, "a")
    assert t.size("a") <= 50 and t.node_count() <= 1


def test_remove_tenant_forgets_only_that_tenant() -> None:
    t = PrefixTree(max_chars=1000)
    t.insert(DOC_A, "a")
    t.insert(DOC_A[:40] + "a different ending", "b")
    t.insert(DOC_B, "a")
    t.remove_tenant("a")
    assert t.size("a") == 0 and t.tenants == ["b"]
    assert t.match(DOC_A).chars == 40 and set(t.match(DOC_A).tenants) == {"b"}
    assert t.match(DOC_B).chars == 0
    _check_invariants(t)


def test_common_prefix_agrees_with_a_character_loop() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        a = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 12)))
        b = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 14)))
        pos = rng.randrange(0, len(b) + 1)
        want = 0
        while want < len(a) and pos + want < len(b) and a[want] == b[pos + want]:
            want += 1
        assert common_prefix(a, b, pos) == want, (a, b, pos)


def _check_invariants(t: PrefixTree) -> None:
    """Sizes match the edges owned; a child's owners are its parent's; no ownerless node is left behind."""
    sizes: dict[str, int] = {}
    todo: list[_Node] = list(t._root.children.values())
    while todo:
        node = todo.pop()
        assert node.tenants and node.text, "an ownerless or empty node was left in the tree"
        parent = node.parent
        assert parent is not None and parent.children[node.text[0]] is node
        if parent is not t._root:
            for tenant, at in node.tenants.items():
                assert tenant in parent.tenants and parent.tenants[tenant] >= at
        for tenant in node.tenants:
            sizes[tenant] = sizes.get(tenant, 0) + len(node.text)
        todo.extend(node.children.values())
    assert sizes == {x: t.size(x) for x in t.tenants}


def test_random_inserts_keep_the_tree_consistent_and_bounded() -> None:
    rng = random.Random(11)
    stems = ["".join(rng.choice("abc") for _ in range(rng.randrange(5, 40))) for _ in range(12)]
    t = PrefixTree(max_chars=300)
    for i in range(600):
        text = rng.choice(stems) + "".join(rng.choice("abcd") for _ in range(rng.randrange(0, 30)))
        t.insert(text, rng.choice("xyz"))
        assert all(t.size(x) <= 300 for x in "xyz")
        if i % 50 == 0:
            _check_invariants(t)
    t.remove_tenant("y")
    _check_invariants(t)


# ---- the policy -----------------------------------------------------------------------------------------


def test_requests_sharing_a_prefix_stay_on_one_prefill_and_new_prefixes_spread() -> None:
    p = CacheAwarePolicy()
    servers = ["a", "b", "c"]
    placed: dict[str, set[str]] = {}
    decisions = []
    for doc in (DOC_A, DOC_B, DOC_C, DOC_A, DOC_B):
        for q in range(3):
            placed.setdefault(doc, set()).add(p.choose("prefill", servers, {}, f"{doc}question {q}?"))
            decisions.append(p.last_decision)
    assert all(len(s) == 1 for s in placed.values()), placed
    assert {next(iter(s)) for s in placed.values()} == {"a", "b", "c"}  # each new prefix on the emptiest server
    assert decisions.count(CacheRoute.LEAST_LOAD) == 3 and decisions.count(CacheRoute.PREFIX) == 12


def test_uneven_loads_send_the_request_to_the_least_loaded_prefill() -> None:
    p = CacheAwarePolicy(balance_abs_threshold=32, balance_rel_threshold=1.5)
    assert p.choose("prefill", ["a", "b"], {}, DOC_A) == "a"
    # within either threshold the prefix wins
    assert p.decide(["a", "b"], {"a": 40, "b": 10}, DOC_A + "?") == ("a", CacheRoute.PREFIX)  # 30 apart
    assert p.decide(["a", "b"], {"a": 100, "b": 67}, DOC_A + "?") == ("a", CacheRoute.PREFIX)  # 100 < 67 * 1.5
    # past both: the least loaded, whatever it holds
    assert p.decide(["a", "b"], {"a": 43, "b": 10}, DOC_A + "?") == ("b", CacheRoute.BALANCE)
    assert p.choose("prefill", ["a", "b"], {"a": 43, "b": 10}, DOC_A + "!") == "b"
    assert p.last_decision is CacheRoute.BALANCE
    # b now holds the prefix too: with both holding it, the less loaded holder takes it
    assert p.decide(["a", "b"], {"a": 5, "b": 2}, DOC_A + "#") == ("b", CacheRoute.PREFIX)
    assert p.decide(["a", "b"], {"a": 1, "b": 2}, DOC_A + "#") == ("a", CacheRoute.PREFIX)


def test_a_small_match_goes_by_load() -> None:
    p = CacheAwarePolicy(cache_threshold=0.5)
    p.choose("prefill", ["a", "b"], {}, DOC_A)
    half = DOC_A[: len(DOC_A) // 2]
    other = half + "z" * (len(DOC_A) - len(half) + 10)  # just under half of it matches
    assert p.decide(["a", "b"], {"a": 1, "b": 0}, other) == ("b", CacheRoute.LEAST_LOAD)
    assert p.decide(["a", "b"], {"a": 0, "b": 1}, other) == ("a", CacheRoute.LEAST_LOAD)
    # a text nobody received, or none at all (a body the servers will refuse): by load, nothing recorded
    assert p.decide(["a", "b"], {"a": 3, "b": 1}, "unrelated") == ("b", CacheRoute.LEAST_LOAD)
    size = p.tree.size("b")
    assert p.choose("prefill", ["a", "b"], {"a": 3, "b": 1}, None) == "b" and p.tree.size("b") == size
    eager = CacheAwarePolicy(cache_threshold=0.0)  # any match at all follows the prefix
    eager.choose("prefill", ["a", "b"], {}, DOC_A)
    assert eager.decide(["a", "b"], {"a": 1}, DOC_A[:5] + "z" * 100) == ("a", CacheRoute.PREFIX)


def test_failed_or_down_prefills_are_not_matched_and_the_retry_takes_the_prefix() -> None:
    p = CacheAwarePolicy()
    assert p.choose("prefill", ["a", "b"], {}, DOC_A) == "a"
    # the router leaves a out of the candidates (down, or it failed this request): b is chosen and now holds it
    assert p.choose("prefill", ["b"], {}, DOC_A + "retry") == "b"
    assert p.last_decision is CacheRoute.LEAST_LOAD
    # back with both: both hold the prefix; b, the last to receive it, wins the tie
    assert p.choose("prefill", ["a", "b"], {}, DOC_A + "later") == "b"
    assert p.last_decision is CacheRoute.PREFIX


def test_decode_goes_by_least_load_and_records_nothing() -> None:
    p = CacheAwarePolicy()
    assert p.choose("decode", ["x", "y"], {"x": 4, "y": 1}, DOC_A) == "y"
    assert p.tree.tenants == [] and p.last_decision is None
    with pytest.raises(ValueError):
        p.choose("prefill", [], {}, DOC_A)


def _cache_routes() -> dict[str, float]:
    text = telemetry.render()[0].decode()
    return {
        d: float(v) for d, v in re.findall(r'^pdserve_router_cache_aware_total\{decision="(\w+)"\} (\S+)$', text, re.M)
    }


def test_each_prefill_choice_is_counted_by_decision() -> None:
    before = _cache_routes()
    p = CacheAwarePolicy(balance_abs_threshold=1, balance_rel_threshold=1.0)
    p.choose("prefill", ["a", "b"], {}, DOC_B)  # least_load
    p.choose("prefill", ["a", "b"], {}, DOC_B + "1")  # prefix
    p.choose("prefill", ["a", "b"], {"a": 5}, DOC_B + "2")  # balance
    p.choose("decode", ["a", "b"], {}, DOC_B)  # not a prefill choice
    after = _cache_routes()
    assert {d: after.get(d, 0) - before.get(d, 0) for d in ("prefix", "least_load", "balance")} == {
        "prefix": 1,
        "least_load": 1,
        "balance": 1,
    }


def test_routing_key_of_each_dialect() -> None:
    assert routing_key({"prompt": "abc"}, "completion") == "abc"
    assert routing_key({"prompt": ["abc", "de"]}, "completion") == "abc\nde"
    assert routing_key({"prompt": [5, 17, 2]}, "completion") == "5 17 2 "
    assert routing_key({"input_ids": [[1, 2], [3]]}, "generate") == "1 2 \n3 "
    assert routing_key({"text": "hi"}, "generate") == "hi"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert routing_key({"messages": chat}, "chat") == "system\nBe brief.\nuser\nx\n"
    # a longer conversation extends the shorter one's key: its prefix
    more = [*chat, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
    longer, shorter = routing_key({"messages": more}, "chat"), routing_key({"messages": chat}, "chat")
    assert longer is not None and shorter is not None and longer.startswith(shorter)
    for bad, dialect in (({"prompt": ""}, "completion"), ({"messages": "x"}, "chat"), ({"text": 3}, "generate")):
        assert routing_key(bad, dialect) is None  # type: ignore[arg-type]
    huge = "w" * (3 * MAX_KEY_CHARS)
    assert len(routing_key({"prompt": [huge, huge]}, "completion") or "") == MAX_KEY_CHARS
    assert len(routing_key({"prompt": list(range(MAX_KEY_CHARS))}, "completion") or "") == MAX_KEY_CHARS
    big_chat = [{"role": "user", "content": huge}] * 3
    assert len(routing_key({"messages": big_chat}, "chat") or "") == MAX_KEY_CHARS


# ---- configuration and flags ----------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    return parser.parse_args(["--prefill", "http://p:1", "--decode", "http://d:2", *argv])


def test_flags_defaults_and_environment_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = router_config(_parse("--policy", "cache_aware"))
    policy = make_policy(cfg.policy, cfg=cfg)
    assert isinstance(policy, CacheAwarePolicy)
    assert policy.info() == {"policy": "cache_aware", "cache_threshold": 0.5, "balance_abs_threshold": 32,
                             "balance_rel_threshold": 1.5, "max_tree_chars": 1 << 22}  # fmt: skip
    args = ["--cache-threshold", "0.3", "--balance-abs-threshold", "4", "--balance-rel-threshold", "1.2"]
    cfg = router_config(_parse("--policy", "cache_aware", *args, "--max-tree-chars", "1000"))
    assert (cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold, cfg.max_tree_chars) == (
        0.3,
        4,
        1.2,
        1000,
    )
    monkeypatch.setenv("PDSERVE_CACHE_THRESHOLD", "0.7")
    monkeypatch.setenv("PDSERVE_MAX_TREE_CHARS", "5000")
    cfg = router_config(_parse())
    assert (cfg.cache_threshold, cfg.max_tree_chars) == (0.7, 5000)
    assert router_config(_parse("--cache-threshold", "0.1")).cache_threshold == 0.1  # the flag wins


@pytest.mark.parametrize(
    "argv, words",
    [(["--cache-threshold", "1.5"], "argument --cache-threshold: must be a number in 0..1"),
     (["--cache-threshold", "half"], "argument --cache-threshold: expected float"),
     (["--balance-abs-threshold", "-1"], "argument --balance-abs-threshold: must be an integer >= 0"),
     (["--balance-abs-threshold", "2.5"], "argument --balance-abs-threshold: expected int"),
     (["--balance-rel-threshold", "0.5"], "argument --balance-rel-threshold: must be a number >= 1"),
     (["--max-tree-chars", "0"], "argument --max-tree-chars: must be an integer >= 1")],
)  # fmt: skip
def test_bad_flag_values_are_refused_naming_the_flag(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert words in capsys.readouterr().err


def test_config_refuses_bad_knobs_naming_flag_and_environment_variable() -> None:
    base: dict[str, Any] = {"prefill": ["http://p:1"], "decode": ["http://d:2"]}
    for field, value, words in (
        ("cache_threshold", -0.1, "cache_threshold (--cache-threshold, $PDSERVE_CACHE_THRESHOLD) must be"),
        ("balance_abs_threshold", True, "--balance-abs-threshold"),
        ("balance_rel_threshold", 0.9, "--balance-rel-threshold, $PDSERVE_BALANCE_REL_THRESHOLD"),
        ("max_tree_chars", 0, "--max-tree-chars"),
    ):
        with pytest.raises(RouterConfigError) as e:
            RouterConfig(**base, **{field: value})
        assert words in str(e.value), e.value
    RouterConfig(**base, policy="cache_aware", cache_threshold=1, balance_abs_threshold=0, balance_rel_threshold=1)


def test_launch_passes_the_policy_and_its_knobs_to_the_router() -> None:
    from pdserve.cli import build_parser, engine_argv, forwarded_argv
    from pdserve.local import child_commands

    argv = ["launch", "--policy", "cache_aware", "--cache-threshold", "0.3", "--router-balance-abs-threshold", "4"]
    args, extra = build_parser().parse_known_args(argv)
    commands = child_commands(args, engine_argv(args), 1, 2, 3, forwarded_argv(extra))
    r = build_parser().parse_args(commands["router"][3:])
    assert (r.policy, r.cache_threshold, r.balance_abs_threshold) == ("cache_aware", 0.3, 4)
    for name in ("prefill", "decode"):  # router-only flags stay with the router
        assert "--cache-threshold" not in commands[name]
    with pytest.raises(SystemExit):  # a bad value: refused before anything starts
        forwarded_argv(["--cache-threshold", "3"])


# ---- through the router, against stand-in servers -------------------------------------------------------


@pytest.fixture
def servers() -> Any:
    s = {"p1": StandIn("prefill"), "p2": StandIn("prefill"), "d1": StandIn("decode")}
    yield s
    for x in s.values():
        x.server.stop()


def _router(prefill: list[str], decode: list[str], **kw: Any) -> tuple[Any, ServerThread]:
    from router.app import create_app

    cfg = RouterConfig(prefill=prefill, decode=decode, policy="cache_aware", health_check_interval_s=0, **kw)
    app = create_app(cfg)
    return app.router, ServerThread(app)


def test_router_keeps_prefixes_together_and_counts_prefills_in_flight(servers: dict[str, StandIn]) -> None:
    p1, p2, d1 = servers["p1"], servers["p2"], servers["d1"]
    router, srv = _router([p1.url, p2.url], [d1.url])
    try:
        where: dict[str, set[str]] = {}
        for doc in (DOC_A, DOC_B, DOC_A, DOC_B):
            for q in range(3):
                n1, n2 = len(p1.requests), len(p2.requests)
                r = httpx.post(srv.url + "/v1/completions", json={"prompt": f"{doc}q{q}", "max_tokens": 1})
                assert r.status_code == 200, r.text
                assert wait_until(lambda n1=n1, n2=n2: len(p1.requests) + len(p2.requests) == n1 + n2 + 1)
                where.setdefault(doc, set()).add("p1" if len(p1.requests) > n1 else "p2")
        assert where == {DOC_A: {"p1"}, DOC_B: {"p2"}}
        # a prefill's 4xx answer ends its leg too (the decode held, so that P's answer is the client's)
        p1.reject, d1.header_hold = 400, threading.Event()
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": DOC_A}).status_code == 400
        p1.reject = None
        d1.header_hold.set()
        assert wait_until(lambda: router.up.prefill_inflight(p1.url) == router.up.prefill_inflight(p2.url) == 0)
    finally:
        srv.stop()


def test_router_retries_a_dead_prefill_and_moves_the_prefix(servers: dict[str, StandIn]) -> None:
    dead, p2, d1 = dead_url(), servers["p2"], servers["d1"]
    router, srv = _router([dead, p2.url], [d1.url])
    try:
        for q in range(3):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": f"{DOC_C}q{q}"})
            assert r.status_code == 200, r.text
        assert len(p2.generate_bodies(3)) == 3
        policy = router.up.policy
        assert (
            policy.tree.match(DOC_C + "q", [p2.url]).chars == len(DOC_C) + 1
        )  # recorded under the server that served it
        assert router.up.prefill_inflight(dead) == 0
        assert wait_until(lambda: router.up.prefill_inflight(p2.url) == 0)
    finally:
        srv.stop()
