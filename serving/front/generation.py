"""The generation endpoints (/generate, /v1/completions, /v1/chat/completions) from body to response.

A request is read within the body limit (`body`), parsed and validated (`serving.api`), tokenized, and
sent as one `GenerateRequest` per prompt under an id the front makes (the client's rid is only echoed);
its outputs are then collected into one JSON body, or streamed as SSE. Every way a request can end —
success, an error status, a client that went away, a bug — is counted once in pdserve_requests_total
and leaves no prompt running in the scheduler.

Text and chat prompts are tokenized by the engine's one rule (`Tokenizer.encode_prompt`,
`Tokenizer.apply_chat_template`, which `pdserve generate` uses too), and refused by their size in bytes
before tokenization when they cannot fit the context.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from serving import api
from serving.front.body import read_body
from serving.front.inflight import ClientGone, Inflight
from serving.front.sse import SSEResponse, sse_body
from serving.front.state import FrontState, error_response
from serving.ipc import GenerateRequest
from tokenization.tokenizer import ChatTemplateError, PromptTooLong

__all__ = ["GenerationEndpoints"]

logger = logging.getLogger("pdserve.front")

# Prompts longer than this (characters) are tokenized in a worker thread: a long prompt can take
# milliseconds to encode, and every other request's stream would stall meanwhile.
_TOKENIZE_INLINE_MAX_CHARS = 2048


class GenerationEndpoints(FrontState):
    """The front's generation endpoints (combined with the others in `app.Front`)."""

    async def handle(self, kind: api.Kind, request: Request) -> Response:
        """Answer one generation request of dialect `kind`."""
        arrival = time.time()
        try:
            reason = self.not_ready_reason()
            if reason is not None:
                raise api.APIError(503, reason)
            body = api.parse_json_body(await read_body(request, self.cfg.max_body_bytes))
            parsed = api.parse_request(kind, body, self.cfg.served_model_name)
            reqs = await self._build_requests(parsed, arrival)
            flight = self.new_flight(
                [r.rid for r in reqs],
                arrival,
                client_rids=[p.rid for p in parsed.prompts],
                rooms=[p.bootstrap_room for p in parsed.prompts],
                group_rid=parsed.group_rid,
            )
            flight.submit(reqs, request)
        except api.APIError as err:
            self.count(err.status)
            return error_response(err)
        except ClientDisconnect:  # gone while still sending its body
            self.count(499, aborted=True)
            return Response(status_code=499)
        except Exception:
            logger.exception("unexpected error while admitting a %s request", kind)
            self.count(500)
            return error_response(api.APIError(500, "internal server error"))
        if parsed.stream:
            return await self._stream(parsed, flight)
        return await self._collect(parsed, flight)

    # -- admission ----------------------------------------------------------------------------------

    async def _build_requests(self, parsed: api.ParsedRequest, arrival: float) -> list[GenerateRequest]:
        reqs = []
        for spec in parsed.prompts:
            ids = spec.input_ids if spec.input_ids is not None else await self._tokenize(spec)
            if not ids:
                raise api.APIError(400, "the prompt is empty after tokenization", param="prompt")
            # The length first: a token-id list far past the context is refused without a look at each id.
            sampling = api.finalize_sampling(spec, len(ids), self.cfg.context_length, parsed.max_tokens_field)
            if spec.input_ids is not None:
                api.check_token_ids(ids, self.vocab_size, "input_ids" if parsed.kind == "generate" else "prompt")
            host, port = spec.bootstrap_host, spec.bootstrap_port
            if port is None and (host is not None or spec.bootstrap_room is not None):
                port = self.cfg.default_bootstrap_port
            reqs.append(
                GenerateRequest(
                    # Ours, unique per prompt: a client rid (spec.rid) may be reused by anyone; it is only echoed.
                    rid=uuid.uuid4().hex,
                    input_ids=list(ids),
                    sampling=sampling,
                    bootstrap_host=host,
                    bootstrap_port=port,
                    bootstrap_room=spec.bootstrap_room,
                    return_logprob=parsed.return_logprob,
                    stream=parsed.stream,
                    arrival_time=arrival,
                )
            )
        return reqs

    async def _tokenize(self, spec: api.PromptSpec) -> list[int]:
        """A text or chat prompt's ids by the engine's one rule; 400 when it cannot fit the context (judged by
        its size before tokenizing) or the chat template refuses it."""
        tok, max_tokens = self.tokenizer, self.cfg.context_length - 1  # at least one token must be generated
        if spec.messages is not None:
            messages = spec.messages
            size = sum(len(m["content"]) for m in messages)

            def enc() -> list[int]:
                return tok.apply_chat_template(messages, max_tokens=max_tokens)
        else:
            text = spec.text
            assert text is not None
            size = len(text)

            def enc() -> list[int]:
                return tok.encode_prompt(text, max_tokens=max_tokens)

        param = "messages" if spec.messages is not None else "prompt"
        try:
            return enc() if size <= _TOKENIZE_INLINE_MAX_CHARS else await asyncio.to_thread(enc)
        except PromptTooLong as exc:
            raise api.prompt_too_large(param, exc.size_bytes, exc.max_token_bytes, self.cfg.context_length) from None
        except ChatTemplateError as exc:
            raise api.APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        except ValueError as exc:  # not valid Unicode (the body parser already refuses lone surrogates)
            raise api.APIError(400, str(exc), param=param) from None

    # -- non-streaming ------------------------------------------------------------------------------

    async def _collect(self, parsed: api.ParsedRequest, flight: Inflight) -> Response:
        status = 200
        try:
            while not flight.all_finished:
                index, out = await flight.next()
                r = flight.record(index, out)
                if r.failed:
                    raise r.api_error()
            return JSONResponse(self._full_body(parsed, flight))
        except ClientGone:
            status = 499  # nginx's "client closed request"; nobody reads it
            return Response(status_code=status)
        except api.APIError as err:
            status = err.status
            return error_response(err)
        except Exception:
            logger.exception("unexpected error while answering a %s request", parsed.kind)
            status = 500
            return error_response(api.APIError(500, "internal server error"))
        finally:
            flight.close()
            self.count(status, flight.aborted)

    def _full_body(self, parsed: api.ParsedRequest, flight: Inflight) -> Any:
        results = flight.results
        if parsed.kind == "generate":
            objs = [
                api.generate_object(
                    r,
                    parsed.return_logprob,
                    self.token_texts(r.output_ids) if parsed.return_text_in_logprobs else None,
                )
                for r in results
            ]
            return objs if parsed.is_batch else objs[0]
        request_id, created = api.new_request_id(parsed.kind), api.now()
        if parsed.kind == "completion":
            lps = (
                [api.completion_logprobs(self.token_texts(r.output_ids), r.logprobs) for r in results]
                if parsed.return_logprob
                else None
            )
            return api.completion_response(request_id, created, parsed.model, results, lps)
        r = results[0]
        lp = api.chat_logprobs(self.token_texts(r.output_ids), r.logprobs) if parsed.return_logprob else None
        return api.chat_response(request_id, created, parsed.model, r, lp)

    # -- streaming ----------------------------------------------------------------------------------

    async def _stream(self, parsed: api.ParsedRequest, flight: Inflight) -> Response:
        # Wait for the first output before committing to a 200 stream: a request that fails early
        # (transfer failure, overload) then gets its real status, which lets the router retry it.
        try:
            first = await flight.next()
            r = flight.record(*first)
            if r.failed:
                raise r.api_error()
        except ClientGone:
            flight.close()
            self.count(499, aborted=True)
            return Response(status_code=499)
        except api.APIError as err:
            flight.close()
            self.count(err.status, flight.aborted)
            return error_response(err)
        except BaseException as exc:  # incl. cancellation: never leave the scheduler generating for nobody
            flight.close()
            if not isinstance(exc, Exception):
                raise
            logger.exception("unexpected error while starting a %s stream", parsed.kind)
            self.count(500)
            return error_response(api.APIError(500, "internal server error"))

        outcome = {"status": 200}

        def on_close() -> None:
            if not flight.closed:  # the generator never ran to its end: the client went away
                flight.aborted = True
                flight.close()
                self.count(outcome["status"], True)

        return SSEResponse(sse_body(parsed, flight, first, outcome, self.token_texts, self.count), on_close)
