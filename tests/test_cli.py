"""`pdserve generate` as a user runs it: a separate process on a built-in model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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
    assert set(out) == {"text", "token_ids", "prompt_token_ids"}

    path = resolve_model("builtin:tiny-llama")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # the servers' rule, transformers' default: special tokens per the tokenizer (tiny-llama's adds none)
    ids = tok("Hello", return_tensors="pt").input_ids
    assert out["prompt_token_ids"] == ids[0].tolist()
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


def test_max_body_bytes_flag_env_twin_and_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from contracts.http import DEFAULT_MAX_BODY_BYTES
    from pdserve.cli import build_parser, engine_argv
    from pdserve.local import child_commands

    for role in ("prefill", "decode", "launch"):
        assert build_parser().parse_args([role]).max_body_bytes == DEFAULT_MAX_BODY_BYTES
        assert build_parser().parse_args([role, "--max-body-bytes", "1234"]).max_body_bytes == 1234
    monkeypatch.setenv("PDSERVE_MAX_BODY_BYTES", "4321")
    args = build_parser().parse_args(["launch"])
    assert args.max_body_bytes == 4321
    commands = child_commands(args, engine_argv(args), 1, 2, 3)
    for name in ("prefill", "decode", "router"):  # the same limit at all three processes
        cmd = commands[name]
        assert cmd[cmd.index("--max-body-bytes") + 1] == "4321", name
    # each child's own parser takes what launch passes it
    build_parser().parse_args(commands["prefill"][3:])
    build_parser().parse_args(commands["router"][3:])
    proc = run_cli("decode", "--max-body-bytes", "0")
    assert proc.returncode == 2 and "--max-body-bytes" in proc.stderr


def test_launch_passes_every_daemon_flag_to_the_daemon_it_concerns() -> None:
    from pdserve.cli import build_parser, engine_argv, forwarded_argv
    from pdserve.local import child_commands

    argv = ["launch", "--decode-request-timeout", "9", "--heartbeat-interval", "0.5", "--pipeline-min-tokens=64",
            "--router-max-retries", "1", "--policy", "least_load", "--request-timeout", "30"]  # fmt: skip
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    forwarded = forwarded_argv(extra)
    commands = child_commands(args, engine_argv(args), 1, 2, 3, forwarded)
    parsed = {name: build_parser().parse_args(cmd[3:]) for name, cmd in commands.items()}
    p, d, r = parsed["prefill"], parsed["decode"], parsed["router"]
    assert p.heartbeat_interval == d.heartbeat_interval == 0.5  # a bare server flag: both servers
    assert p.pipeline_min_tokens == 64  # a prefill-only flag: the prefill
    assert (r.max_retries, r.policy) == (1, "least_load")  # router flags: the router
    assert p.request_timeout == r.request_timeout == 30  # a flag all three have: all three
    assert d.request_timeout == 9  # a prefixed flag wins over the bare one, whatever the order


@pytest.mark.parametrize(
    "flags, words",
    [(["--no-such-flag", "1"], "no daemon takes this flag"),
     (["--decode-pipeline-min-tokens", "1"], "`pdserve decode` has no flag --pipeline-min-tokens"),
     (["--prefill-port", "5"], "sets --port for each daemon itself"),
     (["--heartbeat-interval", "soon"], "invalid float value")],
)  # fmt: skip
def test_launch_refuses_a_bad_pass_through_flag_before_starting(flags: list[str], words: str) -> None:
    proc = run_cli("launch", *flags)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_other_commands_still_refuse_unknown_flags() -> None:
    proc = run_cli("generate", "--prompt", "hi", "--heartbeat-interval", "1")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_launch_sets_each_side_tp_size() -> None:
    """`--prefill-tp-size`/`--decode-tp-size` reach one server each; a bare `--tp-size` reaches both."""
    from pdserve.cli import build_parser, engine_argv, forwarded_argv
    from pdserve.local import child_commands

    for argv, want in ((["--prefill-tp-size", "2", "--decode-tp-size", "1"], (2, 1)),
                       (["--tp-size", "2", "--decode-tp-size", "4"], (2, 4))):  # fmt: skip
        args, extra = build_parser().parse_known_args(["launch", *argv])
        commands = child_commands(args, engine_argv(args), 1, 2, 3, forwarded_argv(extra))
        p, d = (build_parser().parse_args(commands[n][3:]) for n in ("prefill", "decode"))
        assert (p.tp_size, d.tp_size) == want, argv


def test_launch_passes_dp_attention_to_both_sides_or_one() -> None:
    from pdserve.cli import build_parser, engine_argv, forwarded_argv
    from pdserve.local import child_commands

    dp = ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"]
    prefill_only = ["--prefill-tp-size", "2", "--prefill-dp-size", "2", "--prefill-enable-dp-attention"]
    for argv, want in ((dp, ((2, True), (2, True))), (prefill_only, ((2, True), (1, False)))):
        args, extra = build_parser().parse_known_args(["launch", *argv])
        commands = child_commands(args, engine_argv(args), 1, 2, 3, forwarded_argv(extra))
        p, d = (build_parser().parse_args(commands[n][3:]) for n in ("prefill", "decode"))
        assert ((p.dp_size, p.enable_dp_attention), (d.dp_size, d.enable_dp_attention)) == want, argv


def test_launch_passes_chunking_to_both_sides_and_the_prefix_cache_flag_to_prefill() -> None:
    from pdserve.cli import build_parser, engine_argv, forwarded_argv
    from pdserve.local import child_commands

    argv = ["--chunked-prefill-size", "64", "--decode-chunked-prefill-size", "128", "--disable-prefix-cache"]
    args, extra = build_parser().parse_known_args(["launch", *argv])
    commands = child_commands(args, engine_argv(args), 1, 2, 3, forwarded_argv(extra))
    p, d = (build_parser().parse_args(commands[n][3:]) for n in ("prefill", "decode"))
    assert (p.chunked_prefill_size, d.chunked_prefill_size) == (64, 128)
    assert p.disable_prefix_cache and "--disable-prefix-cache" not in commands["decode"]


def test_a_chunk_size_that_is_not_whole_pages_is_refused() -> None:
    proc = run_cli("generate", "--prompt", "hi", "--chunked-prefill-size", "100")
    assert proc.returncode != 0 and "multiple of page_size 16" in proc.stderr, proc.stderr
