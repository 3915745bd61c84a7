"""The colocated engine: prefill and decode in one process with continuous batching.

It is the in-project baseline the disaggregated path is measured against, and the decode server
builds on its pieces (runner, scheduler, sampler, stop handling).

Tensor parallelism is SPMD: each rank is a process with its own `Engine(cfg, tp)` holding its shard of the
model and a KV pool of its KV heads, and every rank runs the same requests through the same scheduler and
the same forward, so every scheduling decision is identical everywhere. The one input that could differ is
randomness: `sample` takes rank 0's tokens and broadcasts them, so every rank appends the same tokens.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import torch

from engine.batch import ForwardBatch, ForwardMode
from engine.builtin import resolve_model
from engine.config import EngineConfig, parse_dtype
from engine.device import resolve_device
from engine.distributed import TPGroup
from engine.dp_attention import DPStepPlan
from engine.headroom import HeadroomEstimator
from engine.kvcache import KVLayout, KVPool
from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.parallel import kv_head_range
from engine.request import FinishReason, Request
from engine.sampling import NON_FINITE_LOGITS, SampleOutput, Sampler, SamplingParams, make_generator
from engine.scheduler import ScheduledBatch, Scheduler
from engine.warmup import warm_up
from tokenization.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    rid: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    error: str | None = None  # why the engine failed the request (finish_reason "abort")


def kv_budget_bytes(cfg: EngineConfig, device: torch.device) -> int:
    if cfg.kv_cache_gb is not None:
        return int(cfg.kv_cache_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    return 2**29


def _progress_line(msg: str) -> None:
    # stderr, not logging: start-up on a GPU takes minutes (kernel compilation) and the default log level
    # would hide why
    print(f"[pdserve] {msg}", file=sys.stderr, flush=True)


def _forward_error(e: Exception) -> str:
    return f"internal error in the forward: {type(e).__name__}: {e}"


class TPStepError(RuntimeError):
    """A forward or sample raised on a tensor-parallel rank: the ranks cannot retry in lockstep (a peer may be
    in a collective the failed rank never reaches), so the rank must stop; its peers then fail their next
    collective at once (connection closed) or within the group's timeout."""


class _SampleFailed:
    """What rank 0 broadcasts when its sampler raised, so every rank raises instead of waiting for a timeout."""

    def __init__(self, error: str) -> None:
        self.error = error


class Engine:
    def __init__(self, cfg: EngineConfig, tp: TPGroup | None = None) -> None:
        """`tp`: the group of this engine's ranks (engine/distributed.py): its tensor-parallel ranks, which shard the
        model, or its context-parallel ranks, which each hold all of it; None for a single rank."""
        cfg.validate()
        self.cfg = cfg
        if tp is None:
            if cfg.world_size > 1:
                raise ValueError(
                    f"tp_size {cfg.tp_size} x cp_size {cfg.cp_size} runs one process per rank: give each rank's "
                    "Engine its TPGroup (engine.distributed.init_tp_group), as `pdserve generate --tp-size` does"
                )
            tp = TPGroup.single(resolve_device(cfg.device))
        elif tp.size != cfg.world_size:
            raise ValueError(
                f"the process group has {tp.size} ranks but tp_size x cp_size is {cfg.tp_size} x {cfg.cp_size}"
            )
        self.tp = tp  # every rank of the engine: scheduling agreement and the sampled tokens go over it
        self.device = tp.device
        # the model's own group: CP ranks hold the whole model (TP=1 within the CP group)
        model_tp = tp if cfg.tp_size > 1 else TPGroup.single(self.device)
        self.cp = tp if cfg.cp_size > 1 else None
        # DP attention: each rank its own requests, attention whole, the MLP split over the group
        self.dp = tp if cfg.dp_attention else None
        self.last_dp_plan: DPStepPlan | None = None  # the last step's agreement (DP attention)
        model_dir = resolve_model(cfg.model)
        t0 = time.perf_counter()
        dtype = parse_dtype(cfg.dtype) if cfg.dtype else None
        self.model = load_model(model_dir, dtype=dtype, device=self.device, tp=model_tp, dp_attention=cfg.dp_attention)
        self.model_config = self.model.config
        self.weight_bytes = self.model.weight_bytes  # this rank's shard
        tp.startup_barrier()  # ranks load at different speeds; every collective after this has the short timeout
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        attn_tp = self.model.attn_tp  # the group attention is split over (one rank under DP attention)
        kv = kv_head_range(self.model_config.num_kv_heads, attn_tp.size, attn_tp.rank)
        layout = KVLayout(
            num_layers=self.model_config.num_layers,
            page_size=cfg.page_size,
            num_kv_heads=kv.count,
            head_dim=self.model_config.head_dim,
            dtype=self.model_config.dtype,
            kv_head_start=kv.start,
            total_kv_heads=self.model_config.num_kv_heads,
        )
        if cfg.num_pages is not None:
            self.pool = KVPool(layout, cfg.num_pages, self.device)
        else:
            # the same page count on every rank (free memory may differ per GPU): the schedulers must agree
            (budget,) = tp.agree_min([kv_budget_bytes(cfg, self.device)])
            self.pool = KVPool.for_budget(layout, budget, self.device)
        self.runner = ModelRunner(self.model, self.pool, cfg.attention_backend, cp=self.cp, dp=self.dp)
        if cfg.enable_two_batch_overlap:
            self.runner.tbo_threshold = cfg.tbo_token_distribution_threshold
        tp.emulated_latency_s = cfg.emulated_collective_latency_ms / 1000
        headroom = HeadroomEstimator(cfg.admission_policy, cfg.init_headroom_ratio, cfg.min_headroom_ratio)  # type: ignore[arg-type]
        self.scheduler = Scheduler(
            self.pool.allocator,
            cfg.page_size,
            cfg.max_batch_size,
            cfg.max_prefill_tokens,
            mixed_chunk_size=cfg.mixed_chunk_size,
            headroom=headroom,
            chunked_prefill_size=cfg.chunked_prefill_size,
        )
        self.sampler = Sampler()
        self.context_length = min(
            cfg.context_length or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._requests: dict[str, Request] = {}
        self._prepare_kernels()
        log.info(
            "loaded %s (%s, %d layers) on %s in %.1fs; KV pool %d pages x %d tokens; %s rank %d/%d: "
            "weights %.1f MiB, KV heads [%d, %d) of %d",
            cfg.model,
            self.model_config.architecture,
            self.model_config.num_layers,
            self.device,
            time.perf_counter() - t0,
            self.pool.num_pages,
            cfg.page_size,
            "CP" if self.cp is not None else "DP-attention" if self.dp is not None else "TP",
            tp.rank,
            tp.size,
            self.weight_bytes / 2**20,
            kv.start,
            kv.stop,
            self.model_config.num_kv_heads,
        )

    def _prepare_kernels(self) -> None:
        """Warm-up, then decode graphs: before the server reports healthy, never on the request path."""
        progress = _progress_line if self.device.type == "cuda" else log.info
        cfg = self.cfg
        if not cfg.skip_warmup:
            secs = warm_up(self.runner, cfg.max_prefill_tokens, self.context_length, progress)
            progress(f"warm-up done in {secs:.1f}s")
        if not cfg.disable_cuda_graph:
            self.runner.capture_graphs(min(cfg.cuda_graph_max_bs, cfg.max_batch_size), progress)

    # -- requests -----------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None) -> Request:
        """Validate and queue a request; raises ValueError with a client-facing message when it cannot run."""
        req = self.make_request(prompt_ids, params, rid)
        self.scheduler.add(req)
        self.track(req)
        return req

    def make_request(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None) -> Request:
        """A validated request, not yet queued (the decode server admits it itself once its KV arrived)."""
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                f"exceeds the context length {self.context_length}"
            )
        if self.scheduler.pages_needed_for(total) > self.pool.num_pages:
            raise ValueError(
                f"request needs {total} tokens of KV but the pool holds {self.pool.num_pages * self.pool.page_size}"
            )
        req = Request(prompt_ids=list(prompt_ids), params=params)
        if rid is not None:
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in use")
            req.rid = rid
        req.generator = make_generator(params.seed, self.device)
        return req

    def track(self, req: Request) -> None:
        """Start detokenizing and stop-checking `req` (done by add_request; the decode server calls it)."""
        self._requests[req.rid] = req
        self._detok[req.rid] = IncrementalDetokenizer(self.tokenizer)

    def admit_prefilled(self, req: Request, first_token: int, logprob: float) -> None:
        """Join a request whose prompt KV is already in `req.pages` (sent by a prefill server) to the running
        batch, starting from the first token the prefill sampled."""
        self.track(req)
        self.scheduler.admit_incoming(req)
        self.append_token(req, first_token, logprob)

    def abort(self, rid: str) -> bool:
        """End a live request and free its pages; False if no such request is live."""
        req = self._requests.get(rid)
        if req is None:
            return False
        self._finish(req, FinishReason.ABORT)
        return True

    def fail(self, req: Request, error: str) -> None:
        """End `req` (in any state, tracked or not) on a failure, freeing its pages; `req.error` says why."""
        if req.finished:
            return
        req.error = error
        self._finish(req, FinishReason.ABORT)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the loop -----------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one batch; returns the requests that got a token or failed (finished ones included).

        A failure ends only the requests it belongs to: a row with non-finite logits fails that request; a
        forward that raises is retried one request at a time (safe: a step's KV writes depend only on the
        request, so a rerun writes the same values), and each request that still raises fails with the
        error. Either way the failed request leaves the running batch and the others get their token.
        Under tensor parallelism a forward that raises raises TPStepError instead: the rank must stop.
        """
        scheduled = self.scheduler.schedule()
        if self.dp is not None:
            return self._dp_step(scheduled)
        if scheduled is None:
            return []
        reqs = scheduled.requests
        try:
            results = [(scheduled, self._run(scheduled))]
        except Exception as e:
            if self.tp.size > 1:
                raise TPStepError(f"rank {self.tp.rank} of {self.tp.size}: {_forward_error(e)}") from e
            if len(reqs) == 1:
                log.exception("request %s failed in the forward", reqs[0].rid)
                self.fail(reqs[0], _forward_error(e))
                return reqs
            log.exception("a batch of %d requests failed; running them one by one", len(reqs))
            results = self._run_one_by_one(scheduled)
        for part, sample in results:
            self._apply(part, sample)
        return reqs

    def _dp_step(self, scheduled: ScheduledBatch | None) -> list[Request]:
        """A DP-attention step: agree with every rank (each has its own requests), then run this rank's batch, an
        IDLE forward when only others have one, or nothing when no rank has one. A failure stops the rank."""
        try:
            if scheduled is None:
                self.last_dp_plan = self.runner.idle_step(self.has_work)
                return []
            batch = self.build_batch(scheduled)
            self.last_dp_plan = self.runner.agree(batch, self.has_work)
            sample = self._run(scheduled, batch)
        except Exception as e:
            raise TPStepError(f"DP rank {self.tp.rank} of {self.tp.size}: {_forward_error(e)}") from e
        self._apply(scheduled, sample)
        return scheduled.requests

    def build_batch(self, scheduled: ScheduledBatch) -> ForwardBatch:
        reqs = scheduled.requests
        return self.runner.build_batch(
            scheduled.new_tokens(),
            [r.num_cached for r in reqs],
            [r.pages for r in reqs],
            mixed=scheduled.mode == ForwardMode.MIXED,
        )

    def _run(self, scheduled: ScheduledBatch, batch: ForwardBatch | None = None) -> SampleOutput | None:
        """The forward of `scheduled`, and a token for each row that samples (None when no row does: every row
        is a prefill chunk short of its request's end)."""
        reqs = scheduled.requests
        batch = batch if batch is not None else self.build_batch(scheduled)
        logits = self.runner.forward(batch)
        rows = [i for i, s in enumerate(scheduled.samples) if s]
        if not rows:
            return None
        if len(rows) < len(reqs):
            logits = logits[rows]
        sampled = [reqs[i] for i in rows]
        return self.sample(logits, [r.params for r in sampled], [r.generator for r in sampled])

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> SampleOutput:
        """One token per row of `logits`. Under tensor parallelism rank 0 samples and broadcasts its result, so
        every rank appends the same tokens (seeded or not); the other ranks do not sample at all. Under DP attention
        each rank samples its own requests."""
        if self.tp.size == 1 or self.dp is not None:
            return self.sampler(logits, params, generators)
        out: SampleOutput | _SampleFailed | None = None
        if self.tp.rank == 0:
            try:
                out = self.sampler(logits, params, generators)
            except Exception as e:
                out = _SampleFailed(f"{type(e).__name__}: {e}")
        out = self.tp.broadcast_object(out, src=0)
        if isinstance(out, _SampleFailed):
            raise RuntimeError(f"sampling failed on rank 0: {out.error}")
        return out

    def _run_one_by_one(self, scheduled: ScheduledBatch) -> list[tuple[ScheduledBatch, SampleOutput | None]]:
        results = []
        for i, req in enumerate(scheduled.requests):
            part = scheduled.row(i)
            try:
                results.append((part, self._run(part)))
            except Exception as e:
                log.exception("request %s failed in the forward", req.rid)
                self.fail(req, _forward_error(e))
        return results

    def _apply(self, part: ScheduledBatch, sample: SampleOutput | None) -> None:
        self.scheduler.complete(part)  # the KV of every row's tokens is in its pages now
        if sample is None:
            return
        sampled = [r for r, s in zip(part.requests, part.samples, strict=True) if s]
        rows = zip(sampled, sample.tokens, sample.token_logprobs, sample.ok(), strict=True)
        for req, token, logprob, ok in rows:
            if not ok:
                self.fail(req, NON_FINITE_LOGITS)
                continue
            try:
                self.append_token(req, token, logprob)
            except Exception as e:  # e.g. the detokenizer: this request's, not the batch's
                log.exception("request %s: cannot record token %d", req.rid, token)
                self.fail(req, f"internal error recording a token: {e}")

    def append_token(self, req: Request, token: int, logprob: float) -> None:
        """Record a sampled token, update the text, and finish the request on a stop condition."""
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        detok = self._detok[req.rid]
        req.output_text += detok.add(token)
        p = req.params
        if p.stop and self._truncate_at_stop_string(req):
            self._finish(req, FinishReason.STOP)
        elif token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            req.output_text += detok.flush()
            self._finish(req, FinishReason.STOP)
        elif len(req.output_ids) >= p.max_new_tokens:
            req.output_text += detok.flush()
            self._finish(req, FinishReason.LENGTH)

    @staticmethod
    def _truncate_at_stop_string(req: Request) -> bool:
        text = req.output_text
        hits = [i for s in req.params.stop if (i := text.find(s)) != -1]
        if not hits:
            return False
        req.output_text = text[: min(hits)]
        return True

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.scheduler.finish(req, reason)
        self._requests.pop(req.rid, None)
        self._detok.pop(req.rid, None)

    # -- convenience ----------------------------------------------------------------------------------

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationOutput]:
        """Run prompts (text or token ids) to completion, batched."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        # every rank validates every prompt (the same error everywhere); under DP attention rank r runs the prompts
        # r, r + N, ... and the outputs are gathered at the end
        reqs = [
            self.make_request(self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p), sp)
            for p, sp in zip(prompts, params_list, strict=True)
        ]
        mine = reqs if self.dp is None else reqs[self.dp.rank :: self.dp.size]
        for req in mine:
            self.scheduler.add(req)
            self.track(req)
        if self.dp is None:
            while not all(r.finished for r in reqs):
                self.step()
            return self._outputs(reqs)
        while True:  # every rank leaves at the same step: the first whose agreement says no rank has work
            self.step()
            if self.last_dp_plan is not None and not self.last_dp_plan.any_work:
                break
        parts = self.dp.all_gather_object(self._outputs(mine))
        size = self.dp.size
        return [parts[i % size][i // size] for i in range(len(reqs))]

    @staticmethod
    def _outputs(reqs: list[Request]) -> list[GenerationOutput]:
        return [
            GenerationOutput(
                rid=r.rid,
                prompt_ids=r.prompt_ids,
                token_ids=r.output_ids,
                text=r.output_text,
                logprobs=r.output_logprobs,
                finish_reason=r.finish_reason.value if r.finish_reason else "abort",
                error=r.error,
            )
            for r in reqs
        ]
