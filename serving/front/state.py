"""What every endpoint of the front shares: config, tokenizer, metrics and the scheduler link.

`FrontState` is the base of the endpoint groups (`generation.GenerationEndpoints`, `info.InfoEndpoints`),
which `app.Front` combines into the one object the routes call; keeping the shared part here lets each
group live in its own module without a back-reference to the app.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from contracts.metrics import Role, get_metrics, status_label
from serving import api
from serving.front.config import FrontConfig
from serving.front.inflight import Inflight
from serving.front.scheduler_client import Route, SchedulerClient
from tokenization.tokenizer import Tokenizer

__all__ = ["FrontState", "error_response"]


def error_response(err: api.APIError) -> JSONResponse:
    """An APIError as the OpenAI-style JSON error it stands for."""
    return JSONResponse(err.body(), status_code=err.status)


def _read_model_config(model_dir: str) -> dict[str, Any]:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class FrontState:
    """The front's shared state; loads the tokenizer now, binds no socket until `scheduler.start()`."""

    def __init__(self, cfg: FrontConfig) -> None:
        self.cfg = cfg
        self.role = Role(cfg.role)
        self.tokenizer = Tokenizer.from_pretrained(cfg.model_dir)
        self.model_config = _read_model_config(cfg.model_dir)
        # Ids the model can embed: the tokenizer's and the config's vocab can differ (padded embeddings).
        self.vocab_size = max(self.tokenizer.vocab_size, int(self.model_config.get("vocab_size") or 0))
        self.metrics = get_metrics()
        self.started_at = time.time()
        self.scheduler = SchedulerClient(cfg.ipc_to_scheduler, cfg.ipc_from_scheduler, self.metrics, self.role)

    @property
    def routes(self) -> dict[str, Route]:
        """Internal rid -> the HTTP request that owns it (for inspection; the scheduler client owns it)."""
        return self.scheduler.routes

    def new_flight(
        self,
        rids: list[str],
        arrival: float,
        record_metrics: bool = True,
        *,
        client_rids: list[str | None] | None = None,
        rooms: list[int | None] | None = None,
        group_rid: str | None = None,
    ) -> Inflight:
        return Inflight(
            self.scheduler,
            rids,
            arrival,
            timeout_s=self.cfg.request_timeout_s,
            metrics=self.metrics,
            role=self.role,
            record_metrics=record_metrics,
            client_rids=client_rids,
            rooms=rooms,
            group_rid=group_rid,
        )

    def not_ready_reason(self) -> str | None:
        """Why the server cannot take requests now (None: it can): no model yet, or a silent scheduler."""
        if self.scheduler.ready_info is None:
            return "the server is starting: the model is not loaded yet"
        stale = self.cfg.stats_stale_after_s
        if stale is not None and time.time() - max(self.scheduler.stats_at, self.started_at) > stale:
            return f"the scheduler sent no stats for more than {stale:g} s"
        return None

    def count(self, status: int, aborted: bool = False) -> None:
        """Count one finished generation request in pdserve_requests_total."""
        self.metrics.requests.labels(role=self.role.value, status=status_label(status, aborted)).inc()

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, for logprob entries."""
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
