"""The CUDA path's logic, on CPU: backend choice, warm-up, host reads per step, CUDA-graph padding.

What needs a GPU (FlashInfer kernels, real graph capture, sync counts measured by CUDA) is in
`bench/gpu_check.py`; here the same code runs with the torch backend and an eager stand-in for the graph.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.attention import choose_backend
from engine.config import EngineConfig
from engine.cuda_graph import EagerGraph, GraphRunner, NoPlugin, bucket_for, capture_sizes
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.sync_probe import HostReadProbe
from engine.warmup import warm_up, warm_up_plan

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


# -- backend choice ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "device", "dtype", "head_dim", "installed", "expected"),
    [
        ("auto", CPU, FP32, 64, True, "torch"),
        ("auto", CPU, BF16, 64, True, "torch"),
        ("auto", CUDA, BF16, 64, True, "flashinfer"),
        ("auto", CUDA, FP16, 128, True, "flashinfer"),
        ("auto", CUDA, FP32, 64, True, "torch"),  # no float32 kernels: the built-in models load as float32
        ("auto", CUDA, BF16, 32, True, "torch"),  # head dim not instantiated
        ("auto", CUDA, BF16, 64, False, "torch"),  # not installed
        ("torch", CUDA, BF16, 64, True, "torch"),
        ("torch", CPU, FP32, 16, False, "torch"),
        ("flashinfer", CUDA, BF16, 256, True, "flashinfer"),
    ],
)
def test_backend_choice(requested, device, dtype, head_dim, installed, expected):
    choice = choose_backend(requested, device, dtype, head_dim, installed=installed)
    assert choice.name == expected
    assert choice.reason


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "installed", "names"),
    [
        (CUDA, FP32, 64, True, ["float32", "--dtype bfloat16"]),
        (CPU, BF16, 64, True, ["CUDA", "cpu"]),
        (CUDA, BF16, 64, False, ["not installed", "pdserve[flashinfer]"]),
        (CUDA, BF16, 96, True, ["head_dim", "96"]),
    ],
)
def test_flashinfer_that_cannot_run_is_a_start_up_error_naming_the_fix(device, dtype, head_dim, installed, names):
    with pytest.raises(ValueError) as e:
        choose_backend("flashinfer", device, dtype, head_dim, installed=installed)
    for name in [*names, "--attention-backend torch"]:
        assert name in str(e.value)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        choose_backend("flash", CPU, FP32, 64)


def test_engine_logs_its_backend_and_why(model_factory, caplog):
    path = model_factory("llama", 31, num_hidden_layers=2)
    with caplog.at_level(logging.INFO, logger="engine"):
        eng = Engine(EngineConfig(model=str(path), device="cpu", num_pages=64, page_size=4))
    assert eng.runner.attention_backend_name == "torch"
    assert any("attention backend: torch" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="FlashInfer needs a CUDA device"):
        Engine(EngineConfig(model=str(path), device="cpu", num_pages=64, attention_backend="flashinfer"))


# -- warm-up -------------------------------------------------------------------------------------------


def test_warm_up_plan_covers_short_and_long_prefill_extend_and_decode():
    labels = [p[0] for p in warm_up_plan(8192, 4096, 100_000, 16)]
    assert labels == ["prefill, short", "prefill, long", "extend on a cached prefix", "decode"]
    long = warm_up_plan(8192, 4096, 100_000, 16)[1]
    assert long[1] == 4095  # as long as the context allows
    # a tiny pool or budget still gets a plan that fits it
    for label, new, prefix, reqs in warm_up_plan(64, 4096, 40, 16):
        assert (new + prefix) * reqs <= 40, label


@pytest.fixture(scope="module")
def engine(model_factory) -> Engine:
    path = model_factory("llama", 32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=256, max_prefill_tokens=100))


def test_warm_up_runs_every_forward_and_gives_its_pages_back(engine: Engine):
    lines: list[str] = []
    free = engine.pool.allocator.num_free
    secs = warm_up(engine.runner, 100, engine.context_length, lines.append)
    assert secs >= 0
    assert engine.pool.allocator.num_free == free
    done = [line for line in lines if line.endswith("s") and "done in" in line]
    assert len(done) == 4, lines


def test_engine_start_up_warms_up_unless_told_not_to(model_factory, caplog):
    path = model_factory("llama", 33, num_hidden_layers=2)
    with caplog.at_level(logging.INFO, logger="engine"):
        Engine(EngineConfig(model=str(path), device="cpu", num_pages=64, page_size=4))
    assert any("warm-up done" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine"):
        Engine(EngineConfig(model=str(path), device="cpu", num_pages=64, page_size=4, skip_warmup=True))
    assert not any("warm-up" in r.getMessage() for r in caplog.records)


# -- host reads per step -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_step_reads_the_device_once(engine: Engine, sampled: bool):
    """Building the batch, attention metadata, RoPE, the forward and the sampler make no device read but the
    one that brings the sampled tokens back (on CUDA each read is a host sync)."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.8 if sampled else 0.0, top_p=0.9,
                            top_k=20, seed=1 if sampled else None)  # fmt: skip
    reqs = [engine.add_request([(5 * i + j) % vocab for j in range(3 + 4 * i)], params) for i in range(3)]
    steps = []
    while not all(r.finished for r in reqs):
        with HostReadProbe() as probe:
            engine.step()
        steps.append(probe)
    assert len(steps) >= 4  # the prefill and at least three decode steps
    for probe in steps:
        assert probe.stray == [], probe.stray
        assert probe.sanctioned == 1


def test_the_probe_sees_stray_reads():
    with HostReadProbe() as probe:
        t = torch.arange(4)
        int(t[1])
        t.tolist()
    assert len(probe.stray) == 2 and probe.sanctioned == 0
    assert "test_cuda_path.py" in probe.stray[0]


# -- CUDA-graph buckets and padding --------------------------------------------------------------------


def test_capture_sizes_and_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    sizes = capture_sizes(64)
    assert sizes[-1] == 64 and sizes == sorted(set(sizes))
    assert [bucket_for(n, sizes) for n in (1, 3, 8, 9, 63, 64)] == [1, 4, 8, 16, 64, 64]
    assert bucket_for(65, sizes) is None
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_graphs_are_off_on_cpu(engine: Engine):
    assert engine.runner.graphs is None
    lines: list[str] = []
    assert engine.runner.capture_graphs(8, lines.append) is False
    assert lines == ["CUDA graphs off: the model runs on cpu"]


class RecordingPlugin(NoPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.captured: list[int] = []
        self.replayed: list[tuple[int, int]] = []

    def capture_one_batch_size(self, graph_batch_size, batch):
        assert batch.batch_size == graph_batch_size
        self.captured.append(graph_batch_size)

    def replay_prepare(self, batch, padded, graph_batch_size):
        assert padded.batch_size == graph_batch_size >= batch.batch_size
        self.replayed.append((batch.batch_size, graph_batch_size))


def test_padded_graph_replay_equals_eager_and_touches_only_the_scratch_page(model_factory):
    """The graph runner's padding, static buffers, scratch page and plugin hooks, with an eager stand-in
    for the captured graph: its decode logits equal the eager forward's for batches that fill a bucket and
    ones that are padded."""
    path = model_factory("llama", 34, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg = dict(model=str(path), device="cpu", page_size=4, num_pages=128, skip_warmup=True)
    eager, graphed = Engine(EngineConfig(**cfg)), Engine(EngineConfig(**cfg))

    plugin = RecordingPlugin()
    graphed.runner.graphs = GraphRunner(graphed.runner, capture_sizes(8), plugin=plugin, graph_factory=EagerGraph)
    graphed.runner.graphs.capture_all(lambda _: None)
    assert sorted(plugin.captured) == [1, 2, 4, 8]
    vocab = eager.model_config.vocab_size
    for bs in (3, 4, 7, 8):
        prompts = [[(11 * i + 3 * j) % vocab for j in range(2 + 3 * i)] for i in range(bs)]
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        ref = eager.generate(prompts, params)
        graphed.pool.k[0][graphed.pool.scratch_page].zero_()
        out = graphed.generate(prompts, params)
        assert [o.token_ids for o in out] == [r.token_ids for r in ref]
        for o, r in zip(out, ref, strict=True):
            assert o.logprobs == pytest.approx(r.logprobs, abs=1e-5)
        # padding rows wrote their KV into the scratch page (and, the outputs being equal, nowhere that counts)
        padded = bs != bucket_for(bs, graphed.runner.graphs.batch_sizes)
        assert bool(graphed.pool.k[0][graphed.pool.scratch_page].any()) == padded
    assert graphed.runner.graphs.replays > 0
    assert (3, 4) in plugin.replayed and (7, 8) in plugin.replayed
    assert graphed.pool.allocator.num_free == graphed.pool.num_pages


def test_decode_batches_beyond_the_largest_graph_run_eagerly(model_factory):
    path = model_factory("llama", 35, num_hidden_layers=2)
    eng = Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=128, skip_warmup=True))

    eng.runner.graphs = GraphRunner(eng.runner, capture_sizes(2), graph_factory=EagerGraph)
    eng.runner.graphs.capture_all(lambda _: None)
    vocab = eng.model_config.vocab_size
    eng.generate([[i % vocab, 1, 2] for i in range(5)], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert eng.runner.graphs.replays == 0
