"""What the GPU checks share: the model, engines built through the issue-11 engine API (a missing piece is a
clear FAIL naming it, not an AttributeError deep in a check), prompts, forwards, logit comparisons and the
transformers reference.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_checks.report import Ctx, Outcome, Skip
from engine.builtin import resolve_model
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams

MODEL = "builtin:bench-llama"  # 24 layers, head_dim 64, GQA 8/2: one small set of FlashInfer kernels
DTYPE = "bfloat16"
PAGE_SIZE = 16
ROOT = Path(__file__).resolve().parents[2]


class MissingApi(RuntimeError):
    """The engine in this tree lacks something a check needs: issue 11's engine work is not (all) in yet."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise Skip("no CUDA")


def engine_config(**kw: Any) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    missing = sorted(set(kw) - names)
    if missing:
        raise MissingApi(f"engine.config.EngineConfig has no field {', '.join(missing)}: the issue-11 engine API "
                         "is not in this tree")  # fmt: skip
    return EngineConfig(**kw)


def backend_name(engine: Engine) -> str:
    runner = engine.runner
    return getattr(runner, "attention_backend_name", None) or runner.attn.name


def graph_runner(engine: Engine) -> Any:
    """`engine.runner.graphs`: None (eager) or the captured graphs (`.batch_sizes`, `.replays`)."""
    if not hasattr(engine.runner, "graphs"):
        raise MissingApi("engine.runner has no `graphs` attribute: CUDA-graph decode (issue 11 item 3) is not in")
    return engine.runner.graphs


def make_engine(
    backend: str = "flashinfer", *, graphs: bool = False, dtype: str = DTYPE, pages: int = 2048,
    max_batch: int = 64, max_bs: int = 32, tbo: bool = False,
) -> Engine:  # fmt: skip
    """An engine on cuda for MODEL, checked to run the attention backend and graph mode asked for (graphs:
    buckets up to `max_bs`, which covers every batch the checks decode)."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    kw: dict[str, Any] = dict(
        model=MODEL, dtype=dtype, device="cuda", attention_backend=backend, page_size=PAGE_SIZE,
        num_pages=pages, max_batch_size=max_batch, max_prefill_tokens=8192,
    )  # fmt: skip
    # without the field the engine has no graphs at all, which is what eager asks for
    if graphs or "disable_cuda_graph" in fields:
        kw["disable_cuda_graph"] = not graphs
    if graphs:
        kw["cuda_graph_max_bs"] = max_bs
    if tbo:  # two-batch overlap (issue 15): its decode graphs come from the TBO plugin
        kw["enable_two_batch_overlap"] = True
    engine = Engine(engine_config(**kw))
    got = backend_name(engine)
    if backend != "auto" and got != backend:
        raise RuntimeError(f"asked for the {backend} attention backend, the engine runs {got}")
    if graphs and graph_runner(engine) is None:
        raise RuntimeError("CUDA graphs asked for, but engine.runner.graphs is None: nothing was captured (the "
                           "engine logged why above)")  # fmt: skip
    if not graphs and getattr(engine.runner, "graphs", None) is not None:
        raise RuntimeError("disable_cuda_graph=True, but engine.runner.graphs is set")
    return engine


def vocab(engine: Engine) -> int:
    return engine.model_config.vocab_size


def random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def alloc(engine: Engine, n_tokens: int) -> list[int]:
    pages = engine.pool.allocator.allocate(engine.pool.pages_for(n_tokens))
    if pages is None:
        raise RuntimeError(f"KV pool full: no room for {n_tokens} tokens")
    return pages


def free(engine: Engine, tables: list[list[int]]) -> None:
    for t in tables:
        engine.pool.allocator.free(t)


def forward(engine: Engine, new: list[list[int]], prefix: list[int], tables: list[list[int]],
            all_tokens: bool = False) -> torch.Tensor:  # fmt: skip
    """One forward through the runner (a decode batch replays a graph where graphs are on); float32 on host."""
    batch = engine.runner.build_batch(new, prefix, tables)
    return engine.runner.forward(batch, all_tokens=all_tokens).float().cpu()


def last_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """[V] logits after `ids` (a fresh prefill), to read the margin an engine saw at one position."""
    table = alloc(engine, len(ids))
    try:
        return forward(engine, [ids], [0], [table])[0]
    finally:
        free(engine, [table])


def generate(engine: Engine, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy token ids, `new` per prompt (EOS ignored); a request the engine failed raises with its error."""
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    failed = [o.error for o in outs if o.error]
    if failed:
        raise RuntimeError(f"the engine failed {len(failed)} request(s): {failed[0]}")
    return [o.token_ids for o in outs]


@dataclasses.dataclass
class Diff:
    max_abs: float
    rel: float  # max |a - b| / max |b|: the difference at the logits' own scale
    argmax_agree: float  # fraction of rows with the same argmax


def compare(a: torch.Tensor, ref: torch.Tensor) -> Diff:
    a, ref = a.float(), ref.float()
    max_abs = (a - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    agree = (a.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return Diff(max_abs, max_abs / scale, agree)


def top2_margin(row: torch.Tensor) -> tuple[float, float]:
    """(top-1 minus top-2 logit, max |logit|) of one [V] row."""
    top = row.float().topk(2).values
    return (top[0] - top[1]).item(), row.float().abs().max().item()


def first_diff(a: list[int], b: list[int]) -> int | None:
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return k if k is not None or len(a) == len(b) else min(len(a), len(b))


# --- the transformers reference --------------------------------------------------------------------------------


def load_hf() -> Any:
    """transformers' own Llama on the same weights, bf16, SDPA, on cuda; EOS off (our side ignores it)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(resolve_model(MODEL)), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = model.to("cuda").eval()
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = None  # generate exactly max_new_tokens, as ignore_eos does
    model.generation_config = gc
    return model


def hf_generate(model: Any, prompts: list[list[int]], new: int, logits: bool = False) -> tuple[list[list[int]], Any]:
    """Greedy tokens for same-length prompts (one batch, no padding); with `logits`, the raw [B, V] logits
    of every step."""
    ids = torch.tensor(prompts, device="cuda")
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, output_logits=logits,
        )  # fmt: skip
    tokens = out.sequences[:, ids.shape[1] :].tolist()
    return tokens, (out.logits if logits else None)


# --- the preparation step (not a check) ---------------------------------------------------------------------


def prepare(ctx: Ctx) -> Outcome:
    """Generate the model and have FlashInfer compile (JIT) every kernel the checks use, once, into its cache,
    so that the checks' budgets do not pay the compile: the engine's own warm-up does it, graphs included."""
    require_cuda()
    t0 = time.monotonic()
    ctx.progress(f"model at {resolve_model(MODEL)} ({time.monotonic() - t0:.0f}s)")
    try:
        engine = make_engine("flashinfer", graphs=True)
        mode = "graphs captured"
    except Exception as e:  # the eager engine still compiles every kernel but the graphs' own
        ctx.progress(f"graphs engine failed ({type(e).__name__}: {e}); preparing the eager engine only")
        engine = make_engine("flashinfer")
        mode = "eager only (graphs failed)"
    ctx.progress(f"engine ready ({time.monotonic() - t0:.0f}s); a first generate")
    generate(engine, random_prompts(vocab(engine), [20, 1500], 1), 4)
    torch.cuda.synchronize()
    return Outcome.of(True, f"FlashInfer kernels ready, {mode}, in {time.monotonic() - t0:.0f}s")
