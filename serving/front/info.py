"""The endpoints around generation: health, server and model info, load, and /abort_request.

The router and SGLang-compatible clients poll these: /health must answer fast and say why the server is
not ready (no model yet, or a scheduler that stopped sending stats), /health_generate proves a real
forward still completes, /get_load and /server_info report the scheduler's latest stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from contracts.pd import ROOM_MAX
from engine.sampling import SamplingParams
from serving import api
from serving.api.fields import is_int
from serving.front.body import read_body
from serving.front.state import FrontState, error_response
from serving.ipc import GenerateRequest

__all__ = ["InfoEndpoints"]


class InfoEndpoints(FrontState):
    """The front's non-generation endpoints (combined with the others in `app.Front`)."""

    def health(self) -> Response:
        reason = self.not_ready_reason()
        if reason is not None:
            return error_response(api.APIError(503, reason))
        return JSONResponse({"status": "ok"})

    async def health_generate(self) -> Response:
        """Generate one token locally (no bootstrap) within health_generate_timeout_s; 503 otherwise."""
        reason = self.not_ready_reason()
        if reason is not None:
            return error_response(api.APIError(503, reason))
        ids = self.tokenizer.encode("hi")[:4] or [self.tokenizer.bos_token_id or 0]
        rid = f"health-generate-{uuid.uuid4().hex}"
        req = GenerateRequest(
            rid=rid,
            input_ids=ids,
            sampling=dataclasses.asdict(SamplingParams(max_new_tokens=1, temperature=0.0)),
            arrival_time=time.time(),
        )
        flight = self.new_flight([rid], req.arrival_time, record_metrics=False)
        try:
            flight.submit([req], None)
            deadline = time.monotonic() + self.cfg.health_generate_timeout_s
            while not flight.all_finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                index, out = await asyncio.wait_for(flight.next(), timeout=left)
                r = flight.record(index, out)
                if r.failed:
                    raise r.api_error()
            return JSONResponse({"status": "ok"})
        except asyncio.TimeoutError:
            msg = f"health generation did not finish within {self.cfg.health_generate_timeout_s:g} s"
            return error_response(api.APIError(503, msg))
        except api.APIError as err:
            return error_response(api.APIError(503, f"health generation failed: {err.message}"))
        finally:
            flight.close()

    async def abort_request(self, request: Request) -> Response:
        """Abort the running prompts a client rid names (each prompt with that rid, and every prompt of a batch
        with that group rid), only those in `bootstrap_room` when it is given (the router names one leg so), or
        every request with `abort_all: true`. Rids here are client names; prompts that ended are not touched."""
        try:
            body = api.parse_json_body(await read_body(request, self.cfg.max_body_bytes))
        except ClientDisconnect:  # gone while still sending its body: nobody to answer
            return Response(status_code=499)
        rid, room, abort_all = body.get("rid"), body.get("bootstrap_room"), body.get("abort_all", False)
        if room is not None and (not is_int(room) or not 0 <= room <= ROOM_MAX):
            raise api.APIError(
                400, f"'bootstrap_room' must be an integer in [0, 2^63-1], got {room!r}", param="bootstrap_room"
            )
        routes = self.scheduler.routes
        if abort_all is True:
            targets = list(routes)
        elif isinstance(rid, str) and rid:
            targets = self.scheduler.named(rid, room)
        else:
            raise api.APIError(400, "'rid' (a non-empty string) or 'abort_all': true is required", param="rid")
        for t in targets:
            self.scheduler.send_abort(t)
            flight = routes.get(t)
            if flight is not None:
                flight.abort_rid(t)
        return JSONResponse({})

    def stats_dict(self) -> dict[str, Any]:
        """The scheduler's latest stats and their age ({} before the first)."""
        s = self.scheduler.stats
        if s is None:
            return {}
        return {
            "running": s.running,
            "queued": s.queued,
            "kv_pages_used": s.kv_pages_used,
            "kv_pages_total": s.kv_pages_total,
            "in_flight_transfers": s.in_flight_transfers,
            "prefix_cache_pages": s.prefix_cache_pages,
            "age_s": round(time.time() - self.scheduler.stats_at, 3),
        }

    def server_info(self) -> dict[str, Any]:
        cfg = self.cfg
        info: dict[str, Any] = {
            "model_path": cfg.model_dir,
            "tokenizer_path": cfg.model_dir,
            "served_model_name": cfg.served_model_name,
            "context_length": cfg.context_length,
            "disaggregation_mode": cfg.role,
            "disaggregation_bootstrap_port": cfg.default_bootstrap_port,
            "dp_size": 1,
            "tp_size": 1,
        }
        info.update(cfg.server_args)
        ready_info = self.scheduler.ready_info
        info.update(ready_info or {})
        info["ready"] = ready_info is not None
        stats = self.stats_dict()
        info["stats"] = stats
        # SGLang's mini_lb reads decode's internal_states.
        info["internal_states"] = [stats]
        return info

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.cfg.model_dir,
            "tokenizer_path": self.cfg.model_dir,
            "served_model_name": self.cfg.served_model_name,
            "is_generation": True,
            "model_type": self.model_config.get("model_type"),
            "architectures": self.model_config.get("architectures"),
            "context_length": self.cfg.context_length,
            "tp_size": self.cfg.server_args.get("tp_size", 1),
        }

    def models(self) -> dict[str, Any]:
        """OpenAI's /v1/models: the one model this server serves."""
        cfg = self.cfg
        return {
            "object": "list",
            "data": [
                {
                    "id": cfg.served_model_name,
                    "object": "model",
                    "created": int(self.started_at),
                    "owned_by": "pdserve",
                    "root": cfg.model_dir,
                    "max_model_len": cfg.context_length,
                }
            ],
        }

    def load(self) -> dict[str, Any]:
        """/get_load: running + queued requests at the scheduler (what the router balances on)."""
        s = self.scheduler.stats
        return {"load": (s.running + s.queued) if s is not None else 0}
