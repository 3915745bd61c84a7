"""`pdserve launch`'s pass-through flags: every flag of `pdserve prefill`, `pdserve decode` and `pdserve router`
that launch does not define itself reaches the daemon it concerns.

- `--prefill-X V`, `--decode-X V`, `--router-X V`: `--X V` to that daemon only (e.g. `--prefill-pipeline-min-tokens
  1`, `--decode-request-timeout 60`, `--router-policy least_load`);
- a bare `--X V`: to every daemon that has the flag (`--heartbeat-interval 1` to both servers, `--pipeline-min-tokens`
  to the prefill, `--policy` to the router, `--request-timeout` to all three).

Launch keeps the flags that wire the stack together (ports, hosts, server lists); naming one is an error, as is a
flag no daemon has. Each daemon's own parser then checks the values, before anything starts.
"""

from __future__ import annotations

import argparse

__all__ = ["ROLES", "FlagError", "known_flags", "split_forwarded"]

ROLES = ("prefill", "decode", "router")
# Set by launch for each child: passing them through would break the stack's wiring.
LAUNCH_OWNS = frozenset(
    {"--host", "--port", "--bootstrap-port", "--prefill", "--decode", "--log-level", "--transfer-backend"}
)


class FlagError(ValueError):
    """A pass-through flag that no daemon takes, or one launch sets itself."""


def known_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string `parser` accepts."""
    return {opt for action in parser._actions for opt in action.option_strings}  # argparse has no public API


def split_forwarded(extra: list[str], known: dict[str, set[str]]) -> dict[str, list[str]]:
    """`extra` (what launch's own parser left) as one argument list per daemon, by the rules above. A prefixed
    flag comes after every bare one, so `--decode-X` wins over `--X` whatever their order."""
    bare: dict[str, list[str]] = {role: [] for role in ROLES}
    only: dict[str, list[str]] = {role: [] for role in ROLES}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise FlagError(f"unexpected argument {token!r}: pass-through flags look like --name value")
        name, eq, inline = token.partition("=")
        values = [inline] if eq else []
        i += 1
        while not eq and i < len(extra) and not extra[i].startswith("--"):
            values.append(extra[i])
            i += 1
        flag, roles, prefixed = _targets(name, known)
        for role in roles:
            (only if prefixed else bare)[role] += [flag, *values]
    return {role: bare[role] + only[role] for role in ROLES}


def _targets(name: str, known: dict[str, set[str]]) -> tuple[str, list[str], bool]:
    """The flag as the daemons spell it, the daemons it goes to, and whether a prefix named one."""
    if name in LAUNCH_OWNS:
        raise FlagError(f"{name}: pdserve launch sets it for each daemon itself")
    bare = [role for role in ROLES if name in known[role]]
    if bare:
        return name, bare, False
    for role in ROLES:
        prefix = f"--{role}-"
        if name.startswith(prefix):
            flag = "--" + name[len(prefix) :]
            if flag in LAUNCH_OWNS:
                raise FlagError(f"{name}: pdserve launch sets {flag} for each daemon itself")
            if flag not in known[role]:
                raise FlagError(f"{name}: `pdserve {role}` has no flag {flag} (see pdserve {role} --help)")
            return flag, [role], True
    raise FlagError(
        f"{name}: no daemon takes this flag; see `pdserve prefill --help`, `pdserve decode --help` and "
        "`pdserve router --help` (prefix --prefill-, --decode- or --router- to send a flag to one of them)"
    )
