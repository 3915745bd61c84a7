"""`pdserve generate` as a user runs it: a separate process on a built-in model."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import transformers

from engine.builtin import resolve_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_generate_json_matches_transformers():
    proc = run_cli("generate", "--model", "builtin:tiny-llama", "--prompt", "Hello", "--json", "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "token_ids"}

    path = resolve_model("builtin:tiny-llama")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("Hello", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    # the engine stops at an eos token exactly where generate does
    assert out["token_ids"] == ref
    assert out["text"] == tok.decode(ref, skip_special_tokens=True)


def test_generate_reports_bad_input_clearly():
    proc = run_cli("generate", "--model", "builtin:no-such-model", "--prompt", "hi")
    assert proc.returncode == 2
    assert "unknown" in proc.stderr.lower() and "tiny-llama" in proc.stderr
    proc = run_cli("generate", "--prompt", "hi", "--temperature", "-1")
    assert proc.returncode == 2 and "temperature" in proc.stderr
