"""bench/gpu_check.py on CPU: every check skips cleanly, --only selects, and the bookkeeping holds (a check
that raises, hangs or crashes its process is a FAIL and the run goes on)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_check import CHECKS, PREPARE
from bench.gpu_checks.report import (
    FAIL,
    PASS,
    SKIP,
    Check,
    Ctx,
    Outcome,
    Result,
    Skip,
    execute,
    exit_status,
    resolve,
    result_line,
    run_checks,
    run_child,
    summary,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
NAMES = [c.name for c in CHECKS]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, even where a GPU is present
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def test_without_cuda_every_check_skips_and_it_exits_0():
    out = gpu_check()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == [f"SKIP {n}: no CUDA" for n in NAMES] + [f"gpu_check: 0 passed, 0 failed, {len(NAMES)} skipped"]
    assert set(NAMES) >= {
        "backend_logits", "greedy_vs_hf", "cuda_graph_equals_eager", "syncs_per_decode_step", "decode_throughput",
        "pipeline_event_order", "nixl_vram_loopback", "pipeline_ttft",
    }  # fmt: skip


def test_only_runs_the_named_checks_in_that_order():
    out = gpu_check("--only", "pipeline_ttft,backend_logits", "--quick")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        "SKIP pipeline_ttft: no CUDA",
        "SKIP backend_logits: no CUDA",
        "gpu_check: 0 passed, 0 failed, 2 skipped",
    ]
    bad = gpu_check("--only", "backend_logits,no_such_check")
    assert bad.returncode == 2
    assert "no_such_check" in bad.stderr and "backend_logits" in bad.stderr  # names the typo and the choices


def test_a_check_process_reports_through_the_mark():
    out = gpu_check("--child", "nixl_vram_loopback", "--child-budget", "30")
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("@@gpu_check_result@@ ")]
    assert '"status": "SKIP"' in line and '"detail": "no CUDA"' in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of each check")
def test_every_check_imports_and_skips_without_cuda():
    # imports every GPU module here (a typo or a wrong import fails this), and each body starts with the guard
    for check in (*CHECKS, PREPARE):
        result = execute(check.name, resolve(check.target), Ctx(check.name))
        assert (result.status, result.detail) == (SKIP, "no CUDA"), check.name


def _fake(name: str, fn) -> tuple[Check, object]:
    return Check(name, f"fake:{name}", 10), fn


def _boom(ctx: Ctx) -> Outcome:
    raise ZeroDivisionError("division by zero in the check")


def test_a_check_that_raises_is_a_fail_and_the_run_goes_on(capsys):
    calls: list[str] = []

    def ok(ctx: Ctx) -> Outcome:
        calls.append(ctx.name)
        return Outcome.of(True, "fine", ["TABLE"])

    def skipped(ctx: Ctx) -> Outcome:
        calls.append(ctx.name)
        raise Skip("mooncake not installed")

    def not_an_outcome(ctx: Ctx) -> Outcome:
        calls.append(ctx.name)
        return None  # type: ignore[return-value]

    def failed(ctx: Ctx) -> Outcome:
        calls.append(ctx.name)
        return Outcome.of(False, "2 of 8 pages differ")

    fakes = dict([_fake("boom", _boom), _fake("ok", ok), _fake("skipped", skipped), _fake("odd", not_an_outcome),
                  _fake("failed", failed)])  # fmt: skip

    def run_one(check: Check, budget: float) -> Result:
        return execute(check.name, fakes[check], Ctx(check.name, deadline=time.monotonic() + budget))

    results = run_checks(list(fakes), run_one, deadline=time.monotonic() + 600)
    out, err = capsys.readouterr()
    assert [(r.name, r.status) for r in results] == [
        ("boom", FAIL), ("ok", PASS), ("skipped", SKIP), ("odd", FAIL), ("failed", FAIL),
    ]  # fmt: skip
    assert calls == ["ok", "skipped", "odd", "failed"]
    assert out.splitlines() == [
        "FAIL boom: ZeroDivisionError: division by zero in the check",
        "PASS ok: fine",
        "SKIP skipped: mooncake not installed",
        "FAIL odd: TypeError: check returned None, not an Outcome of PASS or FAIL",
        "FAIL failed: 2 of 8 pages differ",
    ]
    assert "Traceback" in err and "ZeroDivisionError" in err  # the traceback goes to stderr
    assert results[1].tables == ["TABLE"]
    assert summary(results) == "gpu_check: 1 passed, 3 failed, 1 skipped"
    assert exit_status(results) == 1
    assert exit_status([r for r in results if r.status != FAIL]) == 0


def test_checks_that_cannot_start_in_time_are_skipped_not_run(capsys):
    ran: list[str] = []

    def run_one(check: Check, budget: float) -> Result:
        ran.append(check.name)
        assert budget <= 22  # a check never gets more than the time left
        time.sleep(1.5)  # "a" uses the margin, so "b" would start with under 20 s left
        return Result(check.name, PASS, "ok")

    checks = [Check("a", "fake:a", 100), Check("b", "fake:b", 100)]
    results = run_checks(checks, run_one, deadline=time.monotonic() + 21, min_start_s=20)
    assert ran == ["a"]
    assert [r.status for r in results] == [PASS, SKIP]
    assert "--only b" in results[1].detail
    assert capsys.readouterr().out.splitlines()[1].startswith("SKIP b: not run: the device check's total time")


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_run_child_reads_the_result_and_passes_other_output_to_stderr(capsys):
    res = Result("c", PASS, "42 pages exact", ["T"])
    r = run_child(_child(f"print('noise from a library'); print({result_line(res)!r})"), "c", 30)
    assert (r.name, r.status, r.detail, r.tables) == ("c", PASS, "42 pages exact", ["T"])
    assert "noise from a library" in capsys.readouterr().err


def test_a_child_that_dies_without_a_result_is_a_fail_naming_how():
    r = run_child(_child("import sys; sys.exit(3)"), "dies", 30)
    assert r.status == FAIL and "exit status 3" in r.detail
    r = run_child(_child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"), "segv", 30)
    assert r.status == FAIL and "SIGSEGV" in r.detail


def test_a_child_past_its_budget_is_killed_with_what_it_started(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(120)
    """
    t0 = time.monotonic()
    r = run_child(_child(code), "hang", 3)
    assert r.status == FAIL and "budget of 3s" in r.detail and "--only hang" in r.detail
    assert time.monotonic() - t0 < 60
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the check's own child outlived the kill")


def test_comparison_helpers():
    from bench.gpu_checks.common import compare, first_diff, top2_margin

    assert first_diff([1, 2, 3], [1, 2, 3]) is None
    assert first_diff([1, 2, 3], [1, 5, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2
    d = compare(torch.tensor([[0.0, 2.0], [1.0, -4.0]]), torch.tensor([[0.0, 1.0], [1.0, -4.0]]))
    assert (d.max_abs, d.rel, d.argmax_agree) == (1.0, 0.25, 1.0)
    assert top2_margin(torch.tensor([0.5, 3.0, 2.5, -8.0])) == (0.5, 8.0)
