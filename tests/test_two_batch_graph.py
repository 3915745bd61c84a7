"""The two-batch-overlap plugin of the CUDA-graph runner, on CPU with the runner's eager stand-in for the graph
(a real capture needs a GPU): buckets are even, each is split in halves at capture, the persistent `[a, b]` tensor
holds the children's real token counts at every replay (tbo_cp.md §1.6's examples), replays equal the eager decode,
and a step with overlap off does not replay the overlapped graphs."""

from __future__ import annotations

from typing import ClassVar

import pytest

from engine.config import EngineConfig
from engine.cuda_graph import EagerGraph, even_sizes
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.two_batch import replay_token_counts


def test_even_buckets_and_replay_counts():
    assert even_sizes([1, 2, 4, 8, 16, 24, 30]) == [2, 4, 8, 16, 24, 30]
    assert even_sizes([1, 3]) == [2, 4]
    # graphs for bs 8: 5 real requests → [4, 1]; 3 → [3, 0] (child B all padding, still run); IDLE → [0, 0]
    assert replay_token_counts(8, 5) == (4, 1)
    assert replay_token_counts(8, 3) == (3, 0)
    assert replay_token_counts(8, 0, "idle") == (0, 0)
    with pytest.raises(ValueError, match="even"):
        replay_token_counts(7, 3)


class CountsSpy(EagerGraph):
    """The eager stand-in, recording what the persistent counts tensor holds when the graph 'replays'."""

    seen: ClassVar[list[tuple[int, int]]] = []
    plugin = None

    def replay(self) -> None:
        CountsSpy.seen.append(tuple(CountsSpy.plugin.counts.tolist()))
        super().replay()


def test_tbo_decode_graphs_replay_the_eager_decode(model_factory):
    path = model_factory("llama", 36, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg = dict(model=str(path), device="cpu", page_size=4, num_pages=128, skip_warmup=True)
    eager = Engine(EngineConfig(**cfg))
    graphed = Engine(EngineConfig(**cfg, enable_two_batch_overlap=True))
    runner = graphed.runner
    assert runner.capture_graphs(8, lambda _: None, graph_factory=CountsSpy) is True
    assert runner.graphs.batch_sizes == [2, 4, 8]
    plugin = runner.graphs.plugin
    CountsSpy.plugin = plugin
    assert {bs: (s.seq_index, s.token_index) for bs, s in plugin.splits.items()} == {2: (1, 1), 4: (2, 2), 8: (4, 4)}
    vocab = eager.model_config.vocab_size
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    for bs in (1, 3, 5, 8):
        CountsSpy.seen.clear()
        prompts = [[(7 * i + 5 * j) % vocab for j in range(3 + 2 * i)] for i in range(bs)]
        before = runner.graphs.replays
        out = graphed.generate(prompts, params)
        assert [o.token_ids for o in out] == [o.token_ids for o in eager.generate(prompts, params)]
        assert runner.graphs.replays - before == params.max_new_tokens - 1  # every decode step replayed
        bucket = next(s for s in runner.graphs.batch_sizes if s >= bs)
        assert set(CountsSpy.seen) == {replay_token_counts(bucket, bs)}, bs
    replays = runner.graphs.replays
    runner.tbo_threshold = None  # overlap off: the overlapped graphs must not replay
    graphed.generate([[1, 2, 3], [4, 5]], params)
    assert runner.graphs.replays == replays
    assert graphed.pool.allocator.num_free == graphed.pool.num_pages


def test_tbo_graphs_stay_off_on_cpu_and_say_why(model_factory):
    path = model_factory("llama", 36, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    eng = Engine(EngineConfig(model=str(path), device="cpu", num_pages=64, skip_warmup=True,
                              enable_two_batch_overlap=True))  # fmt: skip
    lines: list[str] = []
    assert eng.runner.capture_graphs(8, lines.append) is False and eng.runner.graphs is None
    assert lines == ["CUDA graphs off: the model runs on cpu"]
