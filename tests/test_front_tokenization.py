"""One tokenization rule for `pdserve generate` and the servers, on a tokenizer whose post-processor adds a BOS.

The model directory is the built-in tiny-llama with its tokenizer given a BOS post-processor (as Llama 3's
has) and a chat template that writes its own BOS and refuses a misplaced system message (`raise_exception`).
Text prompts get the BOS from the tokenizer, chat prompts exactly one from the template, the same ids from the
CLI (a real process) and from the front (real uvicorn and ZMQ over the stand-in scheduler, which records what
it was sent). A template that refuses is a 400 naming its message, and the connection stays usable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import processors

from engine.builtin import resolve_model
from harness.raw_http import RawConnection
from tests.front_standin import Server
from tokenization.tokenizer import BOS_TOKEN, Tokenizer

TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and not loop.first %}"
    "{{- raise_exception('System message must be the first message of the conversation') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def bos_model() -> Iterator[Path]:
    src = resolve_model("builtin:tiny-llama")
    out = Path(tempfile.mkdtemp(prefix="pdserve-bos-model-"))
    try:
        for f in src.iterdir():
            if f.name == "model.safetensors":
                (out / f.name).symlink_to(f)
            elif f.name not in ("tokenizer.json", "chat_template.jinja", "pdserve_builtin.json"):
                shutil.copy(f, out / f.name)
        raw = RawTokenizer.from_file(str(src / "tokenizer.json"))
        bos = raw.token_to_id(BOS_TOKEN)
        raw.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos)]
        )
        raw.save(str(out / "tokenizer.json"))
        (out / "chat_template.jinja").write_text(TEMPLATE)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def srv(bos_model: Path) -> Iterator[Server]:
    s = Server(model_dir=bos_model)
    s.make_ready()
    yield s
    s.close()


def _cli(model: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--model", str(model), "--json", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _sent_ids(srv: Server, rid: str) -> list[int]:
    (internal,) = srv.wait_sent(rid)
    return list(srv.sched.requests[internal].input_ids)


def test_the_rule_on_a_bos_tokenizer(bos_model: Path) -> None:
    tok = Tokenizer.from_pretrained(bos_model)
    bos = tok.bos_token_id
    assert tok.encode_prompt(PROMPT) == [bos, *tok.encode(PROMPT)]  # text: the tokenizer's BOS
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    assert chat[0] == bos and chat.count(bos) == 1  # chat: the template's BOS, not a second one
    # what transformers does by default, for both
    hf = transformers.AutoTokenizer.from_pretrained(bos_model)
    assert hf(PROMPT).input_ids == tok.encode_prompt(PROMPT)
    ref = hf.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(ref) == chat


def test_cli_and_server_encode_text_alike(bos_model: Path, srv: Server) -> None:
    out = _cli(bos_model, "--prompt", PROMPT, "--max-new-tokens", "8")
    r = srv.client.post("/generate", json={"text": PROMPT, "rid": "tok-text", "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200, r.text
    assert out["prompt_token_ids"] == _sent_ids(srv, "tok-text") == srv.tok.encode_prompt(PROMPT)
    assert out["prompt_token_ids"][0] == srv.tok.bos_token_id
    r = srv.client.post("/v1/completions", json={"prompt": PROMPT, "rid": "tok-cmpl", "max_tokens": 1})
    assert r.status_code == 200 and _sent_ids(srv, "tok-cmpl") == out["prompt_token_ids"]
    # and the CLI really generates from those ids (greedy, as transformers does from the same ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(bos_model, dtype=torch.float32).eval()
    ids = torch.tensor([out["prompt_token_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out["token_ids"] and out["token_ids"] == ref[0, ids.shape[1] :].tolist()[: len(out["token_ids"])]


def test_cli_and_server_encode_chat_alike(bos_model: Path, srv: Server) -> None:
    out = _cli(bos_model, "--chat", "--prompt", PROMPT, "--max-new-tokens", "2")
    msgs = [{"role": "user", "content": PROMPT}]
    r = srv.client.post("/v1/chat/completions", json={"messages": msgs, "rid": "tok-chat", "max_tokens": 1})
    assert r.status_code == 200, r.text
    sent = _sent_ids(srv, "tok-chat")
    assert out["prompt_token_ids"] == sent and sent.count(srv.tok.bos_token_id) == 1


def test_a_refusing_chat_template_is_a_400_naming_its_message(srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with RawConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1])) as c:
        r = c.request("POST", "/v1/chat/completions", json.dumps({"messages": msgs}).encode())
        assert r.status == 400, r.body[:300]
        err = json.loads(r.body)["error"]
        assert "System message must be the first message" in err["message"] and err["param"] == "messages"
        ok = c.request("POST", "/v1/chat/completions", json.dumps({"messages": msgs[:1], "max_tokens": 1}).encode())
        assert ok.status == 200, ok.body[:300]
        # a template that fails in any other way is a 400 too, not a 500
        monkeypatch.setattr(srv.tok.hf, "chat_template", "{{ 1 // 0 }}")
        r = c.request("POST", "/v1/chat/completions", json.dumps({"messages": msgs[:1]}).encode())
        assert r.status == 400 and "division" in json.loads(r.body)["error"]["message"], r.body[:300]
        monkeypatch.undo()
        ok = c.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 1}).encode())
        assert ok.status == 200
