"""Counts device→host reads, to check that a step makes no host syncs beyond the one it must.

On CUDA each read of a device tensor (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `int(t)`, ...) waits for the
GPU, so a step that makes several stalls the host several times. On a CPU machine nothing stalls, but the
same calls can still be seen: this mode counts them all, and tells the engine's one sanctioned read
(`engine.device.read_to_host`) apart from stray ones. The GPU check measures the real thing with
`torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import traceback

from torch.overrides import TorchFunctionMode

from engine.device import in_sanctioned_read

_READS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"})


class HostReadProbe(TorchFunctionMode):
    """`with HostReadProbe() as probe: ...`; then `probe.sanctioned` and `probe.stray` (one stack line each)."""

    def __init__(self) -> None:
        super().__init__()
        self.sanctioned = 0
        self.stray: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        is_read = name in _READS or (name == "to" and _to_host(args, kwargs or {}))
        if is_read:
            if in_sanctioned_read():
                if name == "tolist":
                    self.sanctioned += 1
            else:
                self.stray.append(f"{name} at {_caller()}")
        return func(*args, **(kwargs or {}))


def _to_host(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return str(target).startswith("cpu")


def _caller() -> str:
    """The innermost frame of our own code that made the read."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if "/torch/" not in frame.filename and "sync_probe" not in frame.filename:
            return f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno} ({frame.name})"
    return "?"
