"""Bookkeeping of the device check: what a check returns, how one is run so that it can never take the
whole script down (in this process, or in a child process with a time budget), the lines and the summary.

Pure Python on purpose (no torch): the CPU tests exercise all of it, with fake checks and fake children.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# A child prints its result as one stdout line behind this mark; every other stdout line is passed on to stderr.
RESULT_MARK = "@@gpu_check_result@@ "
MAX_DETAIL = 600  # a detail is one line: long exception messages are cut here (the traceback is on stderr)
_T0 = time.monotonic()


def progress(tag: str, msg: str) -> None:
    """A progress line on stderr, flushed at once: the GPU run is watched live, and a kill loses no buffer."""
    print(f"[gpu_check +{time.monotonic() - _T0:6.1f}s] {tag}: {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """Raised by a check that cannot run here; the message is the reason (`SKIP name: reason`)."""


@dataclass
class Outcome:
    """What a check function returns: PASS or FAIL, a one-line detail, and tables printed after all lines."""

    status: str
    detail: str
    tables: list[str] = field(default_factory=list)

    @staticmethod
    def of(ok: bool, detail: str, tables: Sequence[str] = ()) -> Outcome:
        return Outcome(PASS if ok else FAIL, detail, list(tables))


@dataclass
class Result:
    name: str
    status: str
    detail: str
    tables: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Check:
    """One check: `target` is "module:function" (imported only where the check runs, so the CPU path and the
    parent process never import the GPU code); `budget_s` is its wall-clock limit in a child process."""

    name: str
    target: str
    budget_s: float
    about: str = ""


@dataclass
class Ctx:
    """Handed to a check function: its name (for progress lines), --quick, and when its budget ends."""

    name: str
    quick: bool = False
    deadline: float = float("inf")  # time.monotonic() value

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def progress(self, msg: str) -> None:
        progress(self.name, msg)


def one_line(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MAX_DETAIL else flat[: MAX_DETAIL - 3] + "..."


def resolve(target: str) -> Callable[[Ctx], Outcome]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def execute(name: str, fn: Callable[[Ctx], Outcome], ctx: Ctx) -> Result:
    """Run one check function: a Skip is SKIP, any exception a FAIL naming it (traceback on stderr)."""
    t0 = time.monotonic()
    try:
        out = fn(ctx)
        if not isinstance(out, Outcome) or out.status not in (PASS, FAIL):
            raise TypeError(f"check returned {out!r}, not an Outcome of PASS or FAIL")
        result = Result(name, out.status, one_line(out.detail), list(out.tables))
    except Skip as e:
        result = Result(name, SKIP, one_line(str(e)))
    except Exception as e:
        print(f"--- {name} raised:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        result = Result(name, FAIL, one_line(f"{type(e).__name__}: {e}"))
    result.seconds = time.monotonic() - t0
    return result


def result_line(result: Result) -> str:
    """The child's report to its parent (one stdout line)."""
    return RESULT_MARK + json.dumps(asdict(result))


def _exit_words(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def _kill_group(pid: int) -> None:
    """Kill the process group the child leads (it and what it started: a decode peer, a benchmark)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_child(cmd: list[str], name: str, timeout: float) -> Result:
    """Run a check in its own process (a CUDA error poisons only that process's context; a hang is killed at
    its budget) and return what it reported; no report is a FAIL that says how the process ended."""
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env)
    reported: list[Result] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_MARK):
                try:
                    reported.append(Result(**json.loads(line[len(RESULT_MARK) :])))
                except (ValueError, TypeError) as e:
                    sys.stderr.write(f"[gpu_check] unreadable result from {name}: {e}: {line}")
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        reader.join(5)
        return Result(name, FAIL, f"ran past its budget of {timeout:.0f}s and was killed (rerun alone: --only {name})",
                      seconds=time.monotonic() - t0)  # fmt: skip
    _kill_group(proc.pid)  # anything it left behind
    reader.join(10)
    if reported:
        result = reported[-1]
        result.seconds = time.monotonic() - t0
        return result
    return Result(name, FAIL, f"its process ended with {_exit_words(rc)} before reporting a result (a crash in "
                  "native code? its stderr is above)", seconds=time.monotonic() - t0)  # fmt: skip


def run_checks(
    checks: Sequence[Check],
    run_one: Callable[[Check, float], Result],
    deadline: float,
    min_start_s: float = 20.0,
    out=None,
) -> list[Result]:
    """Run each check in turn with min(its budget, the time left), printing its line as soon as it ends; a
    check that cannot start in time is SKIPped with how to run it alone. Never raises for a check's sake."""
    out = out or sys.stdout
    results = []
    for check in checks:
        left = deadline - time.monotonic()
        if left < min_start_s:
            result = Result(check.name, SKIP, f"not run: the device check's total time budget was spent "
                            f"(rerun alone: --only {check.name})")  # fmt: skip
        else:
            progress(check.name, f"starting (budget {min(check.budget_s, left):.0f}s){': ' if check.about else ''}"
                     f"{check.about}")  # fmt: skip
            try:
                result = run_one(check, min(check.budget_s, left))
            except Exception as e:  # the runner itself failed (e.g. could not start a process)
                traceback.print_exc(file=sys.stderr)
                result = Result(check.name, FAIL, one_line(f"could not run the check: {type(e).__name__}: {e}"))
            progress(check.name, f"{result.status} after {result.seconds:.1f}s")
        print(result.line(), file=out, flush=True)
        results.append(result)
    return results


def summary(results: Sequence[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    return f"gpu_check: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"


def exit_status(results: Sequence[Result]) -> int:
    return 1 if any(r.status == FAIL for r in results) else 0


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (right-aligned columns), title first."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] + ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
