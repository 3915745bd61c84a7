"""The OpenAI-compatible front door: sends each request to one prefill and one decode server (HTTP only).

Light on purpose: importing `router` pulls in no HTTP stack; `router.app` has the server.
"""

from router.config import PrefillServer, RouterConfig, RouterConfigError, add_router_args, router_config

__all__ = ["PrefillServer", "RouterConfig", "RouterConfigError", "add_router_args", "router_config"]
