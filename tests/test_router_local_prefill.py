"""Conditional disaggregation in the router: short requests are prefilled on the decode server (DESIGN §2).

- the decision, unit by unit: text / chat / token ids / batches, the boundary N vs N+1 tokens, 0 turns it off, no
  tokenizer means remote, and a body the router cannot count goes remote;
- the count is the servers' own: a real HTTP front (tests/front_standin.py) tokenizes the same bodies, and the
  router's boundary sits exactly at the length of the ids that front sent its scheduler (a tokenizer with a BOS
  post-processor and a chat template that writes its own BOS, so a rule that forgets or doubles a special token fails);
- the flags, their environment twins, validation, and `pdserve launch` passing --tokenizer;
- routing through a real router between stand-in servers (tests/test_router.py): a local request reaches only the
  decode server, without bootstrap fields; retries, aborts, the X-PD-Prefill header and the decision metric.
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.metrics import PrefillPath
from engine.builtin import resolve_model
from router.config import DEFAULT_LOCAL_PREFILL_MAX_TOKENS, RouterConfig, RouterConfigError, add_router_args
from router.config import router_config as config_of
from router.local_prefill import PrefillDecider, prompts_of
from tests.front_standin import Server
from tests.test_front_tokenization import PROMPT, bos_model  # noqa: F401 (fixture)
from tests.test_router import StandIn, dead_url, wait_until
from tokenization.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(120)

LOCAL, REMOTE = PrefillPath.LOCAL, PrefillPath.REMOTE
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return str(resolve_model("builtin:tiny-llama"))


@pytest.fixture(scope="module")
def bos_tok(bos_model: Path) -> Tokenizer:  # noqa: F811
    return Tokenizer.from_pretrained(bos_model)


def decider(tok: Tokenizer, n: int) -> PrefillDecider:
    return PrefillDecider(n, tok, "test")


def boundary(tok: Tokenizer, body: dict[str, Any], dialect: Any, tokens: int) -> None:
    """Local at N = tokens, remote at N = tokens - 1: the request's longest prompt has exactly `tokens` tokens."""
    assert decider(tok, tokens).decide(body, dialect) is LOCAL, (body, tokens)
    assert decider(tok, tokens - 1).decide(body, dialect) is REMOTE, (body, tokens)


# ---- the decision ------------------------------------------------------------------------------------------------


def test_text_chat_and_ids_at_the_boundary(bos_tok: Tokenizer) -> None:
    n_text = len(bos_tok.encode_prompt(PROMPT))
    assert bos_tok.encode_prompt(PROMPT)[0] == bos_tok.bos_token_id  # the BOS counts: the servers send it
    boundary(bos_tok, {"text": PROMPT}, "generate", n_text)
    boundary(bos_tok, {"prompt": PROMPT}, "completion", n_text)
    n_chat = len(bos_tok.apply_chat_template(CHAT))
    boundary(bos_tok, {"messages": CHAT}, "chat", n_chat)
    # content as text parts is joined by newlines, as the servers' chat parser joins it
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    n_parts = len(bos_tok.apply_chat_template([{"role": "user", "content": "a\nb"}]))
    boundary(bos_tok, {"messages": parts}, "chat", n_parts)
    boundary(bos_tok, {"input_ids": [5] * 9}, "generate", 9)
    boundary(bos_tok, {"prompt": [5] * 9}, "completion", 9)


def test_a_batch_is_local_only_when_every_prompt_is_short(bos_tok: Tokenizer) -> None:
    short, long = "hi", PROMPT * 3
    n_long = len(bos_tok.encode_prompt(long))
    boundary(bos_tok, {"text": [short, long, short]}, "generate", n_long)
    boundary(bos_tok, {"prompt": [long, short]}, "completion", n_long)
    boundary(bos_tok, {"input_ids": [[1, 2], [3] * 7]}, "generate", 7)
    boundary(bos_tok, {"prompt": [[1] * 4, [2, 3]]}, "completion", 4)


def test_off_without_tokenizer_or_threshold(bos_tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    body = {"prompt": "x"}
    assert PrefillDecider(0, bos_tok).decide(body, "completion") is REMOTE
    assert PrefillDecider(1000, None).decide(body, "completion") is REMOTE
    caplog.set_level(logging.WARNING, "pdserve.router")
    d = PrefillDecider.from_config(RouterConfig(prefill=["http://p:1"], decode=["http://d:1"]))
    assert not d.active and d.decide(body, "completion") is REMOTE
    assert d.info() == {
        "active": False,
        "local_prefill_max_tokens": DEFAULT_LOCAL_PREFILL_MAX_TOKENS,
        "tokenizer": None,
        "off_because": "no --tokenizer: the router cannot count prompt tokens",
    }
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "conditional disaggregation is off: pass --tokenizer" in warning.getMessage()
    caplog.clear()  # switched off on purpose: nothing to warn about
    d = PrefillDecider.from_config(
        RouterConfig(prefill=["http://p:1"], decode=["http://d:1"], local_prefill_max_tokens=0)
    )
    assert not caplog.records and d.info()["off_because"] == "--local-prefill-max-tokens is 0"


@pytest.mark.parametrize(
    "body, dialect",
    [
        ({"text": "hi", "input_ids": [1]}, "generate"),  # both: the servers' 400
        ({"text": ""}, "generate"),
        ({"input_ids": []}, "generate"),
        ({"input_ids": [1, "2"]}, "generate"),
        ({"prompt": ["a", 1]}, "completion"),
        ({"prompt": None}, "completion"),
        ({"messages": []}, "chat"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "chat"),
        ({"messages": [{"content": "no role"}]}, "chat"),
        # the template raises (a system message after the first): the servers answer that 400
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}, "chat"),
    ],
)
def test_what_cannot_be_counted_goes_remote(bos_tok: Tokenizer, body: dict[str, Any], dialect: Any) -> None:
    assert decider(bos_tok, 10_000).decide(body, dialect) is REMOTE


def test_a_long_text_is_not_tokenized(bos_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its size alone shows it cannot fit: the router's CPU per request is bounded by N, not by the prompt."""
    d = decider(bos_tok, 8)
    calls: list[str] = []
    monkeypatch.setattr(bos_tok.hf, "encode", lambda text, **kw: calls.append(text) or [1])
    huge = "x" * (8 * (bos_tok.max_token_bytes or 1) + 1)
    assert d.decide({"text": huge}, "generate") is REMOTE and calls == []
    assert d.decide({"text": [huge, "hi"]}, "generate") is REMOTE and calls == []
    assert d.decide({"text": "hi"}, "generate") is LOCAL and calls == ["hi"]


def test_the_count_is_the_servers_count(bos_model: Path, bos_tok: Tokenizer) -> None:  # noqa: F811
    """The same bodies through a real HTTP front: the ids it sends its scheduler have exactly the router's count."""
    srv = Server(model_dir=bos_model)
    try:
        srv.make_ready()
        bodies = [
            ("/generate", "generate", {"text": PROMPT}),
            ("/v1/completions", "completion", {"prompt": "  two  spaces\n\tand a tab", "max_tokens": 1}),
            ("/v1/chat/completions", "chat", {"messages": CHAT, "max_tokens": 1}),
            ("/v1/chat/completions", "chat", {"messages": [{"role": "user", "content": "ünïcödé ☃"}], "max_tokens": 1}),
            ("/generate", "generate", {"input_ids": [7, 8, 9]}),
        ]
        for i, (path, dialect, body) in enumerate(bodies):
            rid = f"count-{i}"
            r = srv.client.post(path, json={**body, "rid": rid})
            assert r.status_code == 200, r.text
            (internal,) = srv.wait_sent(rid)
            boundary(bos_tok, body, dialect, len(srv.sched.requests[internal].input_ids))
    finally:
        srv.close()


def test_prompts_of_reads_each_dialect_as_the_servers_do() -> None:
    assert prompts_of({"input_ids": [[1], [2, 3]]}, "generate") == [("ids", [1]), ("ids", [2, 3])]
    assert prompts_of({"prompt": ["a", "b"]}, "completion") == [("text", "a"), ("text", "b")]
    msgs = [{"role": "assistant", "content": None, "extra": 1}]
    assert prompts_of({"messages": msgs}, "chat") == [("chat", [{"role": "assistant", "content": ""}])]
    assert prompts_of({"prompt": "x"}, "generate") is None  # another dialect's field does not count


# ---- flags, config, launch ---------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_router_args(p)
    return p.parse_args(["--prefill", "http://p:1", "--decode", "http://d:1", *argv])


def test_flags_and_environment_twins(monkeypatch: pytest.MonkeyPatch, tiny_dir: str) -> None:
    cfg = config_of(parse([]))
    assert cfg.local_prefill_max_tokens == DEFAULT_LOCAL_PREFILL_MAX_TOKENS and cfg.tokenizer is None
    assert not cfg.local_prefill
    cfg = config_of(parse(["--local-prefill-max-tokens", "5", "--tokenizer", tiny_dir]))
    assert (cfg.local_prefill_max_tokens, cfg.tokenizer, cfg.local_prefill) == (5, tiny_dir, True)
    monkeypatch.setenv("PDSERVE_LOCAL_PREFILL_MAX_TOKENS", "7")
    monkeypatch.setenv("PDSERVE_TOKENIZER", tiny_dir)
    cfg = config_of(parse([]))
    assert (cfg.local_prefill_max_tokens, cfg.tokenizer) == (7, tiny_dir)
    assert config_of(parse(["--local-prefill-max-tokens", "0"])).local_prefill is False  # the flag beats the env
    monkeypatch.setenv("PDSERVE_LOCAL_PREFILL_MAX_TOKENS", "lots")
    with pytest.raises(SystemExit):
        parse([])


def test_bad_values_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RouterConfigError, match=r"--local-prefill-max-tokens.*must be an integer >= 0.*got -1"):
        config_of(parse(["--local-prefill-max-tokens", "-1"]))
    with pytest.raises(RouterConfigError, match=r"--tokenizer.*is not a directory"):
        config_of(parse(["--tokenizer", str(tmp_path / "nope")]))
    # a directory without a tokenizer: refused before serving, by `python -m router` too
    from router.app import create_app
    from router.cli import main

    cfg = RouterConfig(prefill=["http://p:1"], decode=["http://d:1"], tokenizer=str(tmp_path))
    with pytest.raises(RouterConfigError, match=r"^--tokenizer: no tokenizer files"):
        create_app(cfg)
    with pytest.raises(SystemExit):
        main(["--prefill", "http://p:1", "--decode", "http://d:1", "--tokenizer", str(tmp_path)])
    assert "--tokenizer: no tokenizer files" in capsys.readouterr().err


def test_launch_gives_the_router_the_model_dir(monkeypatch: pytest.MonkeyPatch, tiny_dir: str) -> None:
    from pdserve import local
    from pdserve.cli import build_parser, engine_argv, forwarded_argv

    args, extra = build_parser().parse_known_args(["launch", "--local-prefill-max-tokens", "16"])
    commands = local.child_commands(args, engine_argv(args), 1, 2, 3, forwarded_argv(extra), tiny_dir)
    r = build_parser().parse_args(commands["router"][3:])
    assert (r.tokenizer, r.local_prefill_max_tokens) == (tiny_dir, 16)
    assert "--tokenizer" not in commands["prefill"] + commands["decode"]
    # a --router-tokenizer given to launch wins over the model's directory
    args, extra = build_parser().parse_known_args(["launch", "--router-tokenizer", "/elsewhere"])
    commands = local.child_commands(args, engine_argv(args), 1, 2, 3, forwarded_argv(extra), tiny_dir)
    assert build_parser().parse_args(commands["router"][3:]).tokenizer == "/elsewhere"

    # launch_local resolves builtin:NAME itself: children are recorded, not started
    started: list[list[str]] = []

    class Exited:
        returncode = 0

        def __init__(self, cmd: list[str]) -> None:
            started.append(cmd)

        def poll(self) -> int:
            return 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(local.subprocess, "Popen", Exited)
    monkeypatch.setattr(local.signal, "signal", lambda *a: None)
    args, _ = build_parser().parse_known_args(["launch", "--model", "builtin:tiny-llama"])
    assert local.launch_local(args, engine_argv(args), {}) == 1  # every "child" exited at once
    router_cmd = next(c for c in started if "router" in c)
    assert router_cmd[router_cmd.index("--tokenizer") + 1] == tiny_dir


# ---- routing through a real router ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standins() -> Iterator[dict[str, StandIn]]:
    servers = {"p1": StandIn("prefill"), "d1": StandIn("decode"), "d2": StandIn("decode")}
    yield servers
    for s in servers.values():
        s.server.stop()


@pytest.fixture
def sv(standins: dict[str, StandIn]) -> Iterator[dict[str, StandIn]]:
    for s in standins.values():
        s.reset()
    yield standins
    for s in standins.values():
        if s.header_hold is not None:
            s.header_hold.set()


def decisions(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for path in ("local", "remote"):
        m = re.search(rf'^pdserve_pd_decision_total{{path="{path}"}} (\S+)$', text, re.M)
        out[path] = float(m.group(1)) if m else 0.0
    return out


def test_short_requests_reach_only_decode_without_bootstrap_fields(
    sv: dict[str, StandIn], make_router: Any, tiny_dir: str
) -> None:
    url = make_router([(sv["p1"].url, 8998)], [sv["d1"].url], tokenizer=tiny_dir, local_prefill_max_tokens=16)
    before = decisions(url)
    # a client's own bootstrap fields are dropped too: they would make D wait for KV nobody sends
    body = {"prompt": "hi", "max_tokens": 2, "bootstrap_room": 5, "bootstrap_host": "h"}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["x-pd-prefill"] == "local"
    with httpx.stream("POST", url + "/generate", json={"text": ["a", "b"], "rid": "g", "stream": True}) as s:
        assert s.headers["x-pd-prefill"] == "local" and s.read().endswith(b"data: [DONE]\n\n")
    [(_, first), (_, batch)] = sv["d1"].requests
    for sent in (first, batch):
        assert not {"bootstrap_host", "bootstrap_port", "bootstrap_room"} & set(sent)
    assert isinstance(first["rid"], str) and len(first["rid"]) == 32 and first["prompt"] == "hi"
    assert batch["rid"] == ["g_0", "g_1"]  # the rid rule as for remote requests

    # long: both legs, with bootstrap fields, as before
    r = httpx.post(url + "/v1/completions", json={"prompt": "word " * 40, "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-pd-prefill"] == "remote"
    [p_body] = sv["p1"].generate_bodies(1)
    assert p_body == sv["d1"].requests[-1][1] and p_body["bootstrap_port"] == 8998
    # a large body is counted off the event loop (app.DECIDE_INLINE_MAX_BYTES), to the same decision
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "user": "u" * 20_000})
    assert r.status_code == 200 and r.headers["x-pd-prefill"] == "local"
    r = httpx.post(url + "/v1/completions", json={"prompt": "word " * 5_000})
    assert r.status_code == 200 and r.headers["x-pd-prefill"] == "remote"
    after = decisions(url)
    assert (after["local"] - before["local"], after["remote"] - before["remote"]) == (3, 2)
    assert len(sv["p1"].generate_bodies(2)) == 2  # none of the short ones ever reached the prefill


def test_off_switches_send_everything_remote(sv: dict[str, StandIn], make_router: Any, tiny_dir: str) -> None:
    for kw in ({"tokenizer": tiny_dir, "local_prefill_max_tokens": 0}, {}):
        url = make_router([sv["p1"].url], [sv["d1"].url], **kw)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 200 and r.headers["x-pd-prefill"] == "remote"
        assert "bootstrap_room" in sv["d1"].requests[-1][1]
        info = httpx.get(url + "/readiness").json()["local_prefill"]
        assert info["active"] is False and info["off_because"]
    url = make_router([sv["p1"].url], [sv["d1"].url], tokenizer=tiny_dir)
    assert httpx.get(url + "/readiness").json()["local_prefill"] == {
        "active": True, "local_prefill_max_tokens": DEFAULT_LOCAL_PREFILL_MAX_TOKENS, "tokenizer": tiny_dir,
    }  # fmt: skip


def test_local_retries_pick_another_decode(sv: dict[str, StandIn], make_router: Any, tiny_dir: str) -> None:
    dead = dead_url()
    url = make_router([sv["p1"].url], [dead, sv["d1"].url], tokenizer=tiny_dir, max_retries=2)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200 and r.headers["x-pd-prefill"] == "local" and len(sv["d1"].requests) == 1

    # a 503 from D: retried on the other D; the first told to drop the rid (no room: there is none)
    sv["d1"].reset()
    sv["d1"].reject = 503
    url = make_router([sv["p1"].url], [sv["d1"].url, sv["d2"].url], tokenizer=tiny_dir)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200 and r.headers["x-pd-prefill"] == "local"
    [(_, d1_body)], [(_, d2_body)] = sv["d1"].requests, sv["d2"].requests
    assert d1_body["rid"] != d2_body["rid"]
    assert wait_until(lambda: sv["d1"].abort_rooms == [(d1_body["rid"], None)])

    # every decode unavailable: the error still says where the request was to be prefilled
    sv["d2"].reject = 503
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.headers["x-pd-prefill"] == "local"
    assert "no decode server (prefilling locally) could serve" in r.json()["error"]["message"]
    assert sv["p1"].requests == [] and sv["p1"].aborts == []


def test_client_disconnect_aborts_the_decode_only(sv: dict[str, StandIn], make_router: Any, tiny_dir: str) -> None:
    url = make_router([sv["p1"].url], [sv["d1"].url], tokenizer=tiny_dir)
    sv["d1"].header_hold = threading.Event()
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(10, read=2.0)) as c:
        c.post(url + "/v1/completions", json={"prompt": ["a", "b"]})
    assert wait_until(lambda: len(sv["d1"].requests) == 1)
    rids = sv["d1"].requests[0][1]["rid"]
    assert wait_until(lambda: sorted(sv["d1"].abort_rooms) == sorted((rid, None) for rid in rids))
    assert sv["p1"].requests == [] and sv["p1"].aborts == []


def test_local_requests_reach_a_real_front_as_local_ones(
    sv: dict[str, StandIn], make_router: Any, tiny_dir: str
) -> None:
    """Through a real decode front: the scheduler gets the prompt with no bootstrap room, i.e. prefills it itself."""
    srv = Server()
    try:
        srv.make_ready()
        url = make_router([sv["p1"].url], [srv.url], tokenizer=tiny_dir, local_prefill_max_tokens=8)
        r = httpx.post(url + "/generate", json={"text": "hi", "rid": "front", "sampling_params": {"max_new_tokens": 1}})
        assert r.status_code == 200 and r.headers["x-pd-prefill"] == "local", r.text
        (internal,) = srv.wait_sent("front")
        sent = srv.sched.requests[internal]
        assert sent.bootstrap_room is None and sent.bootstrap_host is None and sent.input_ids == srv.tok.encode("hi")
    finally:
        srv.close()
