"""`python -m router`: the router on its own, with a command line close to sglang-router's PD mode:

    python -m router --prefill http://p0:30000 8998 --prefill http://p1:30000 --decode http://d0:30000

The flags themselves live in `router.config` (`add_router_args`, `router_config`) so `pdserve router` shares them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from router.config import RouterConfigError, add_router_args, router_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description="pdserve prefill/decode router")
    add_router_args(parser)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        cfg = router_config(args)
    except RouterConfigError as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from router.app import run_router

    try:
        run_router(cfg, log_level=args.log_level)
    except RouterConfigError as e:  # raised before serving (a --tokenizer that cannot be loaded)
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
