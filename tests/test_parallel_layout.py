"""Tensor-parallel layout without processes: split checks, vocabulary slices, the shard each rank's loader reads
(compared with the whole model), the one-rank group, configuration and flags."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.distributed import TPGroup, rank_device
from engine.loader import LoadError, check_model_tp, load_model
from engine.models.parallel_layers import vocab_shard
from engine.parallel import TPLayoutError

CPU = torch.device("cpu")


def model_config(**kw) -> ModelConfig:
    raw = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=160,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    raw.update(kw)
    return ModelConfig.from_dict(raw)


@pytest.mark.parametrize(
    "kw, tp, words",
    [({}, 3, "does not divide the 4 attention heads"),
     ({}, 8, "does not divide the 4 attention heads"),
     ({"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}, 2, "does not divide the 3 KV heads"),
     ({"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 128}, 8, None),  # replicated KV heads
     ({"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96, "intermediate_size": 162}, 3,
      "not a multiple"),
     ({"intermediate_size": 162}, 4, "intermediate_size 162"),
     ({}, 0, "must be >= 1")],
)  # fmt: skip
def test_check_model_tp(kw, tp, words):
    cfg = model_config(**kw)
    if words is None:
        check_model_tp(cfg, tp)
        return
    with pytest.raises(TPLayoutError, match=words):
        check_model_tp(cfg, tp)


@pytest.mark.parametrize("vocab", [512, 513, 515, 3])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_vocab_slices_cover_the_vocabulary_once(vocab: int, size: int):
    shards = [vocab_shard(vocab, TPGroup(r, size, CPU)) for r in range(size)]
    assert len({rows for _, rows, _ in shards}) == 1  # equal slices (the padded vocabulary)
    covered = [t for start, _, real in shards for t in range(start, start + real)]
    assert covered == list(range(vocab))


@pytest.fixture(scope="module")
def biased_model(model_factory):
    return model_factory("llama", 61, attention_bias=True, mlp_bias=True, vocab_size=515)


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_loads_exactly_its_shard(biased_model, size: int):
    full = dict(load_model(biased_model).named_parameters())
    cfg = ModelConfig.from_pretrained(biased_model)
    hd, hq, hkv, inter = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    q_full, kv_full = hq * hd, hkv * hd
    for rank in range(size):
        model = load_model(biased_model, tp=TPGroup(rank, size, CPU))
        shard = dict(model.named_parameters())
        assert set(shard) == set(full)
        q = hq // size * hd
        kv_head = rank * hkv // size if size <= hkv else rank // (size // hkv)
        kv = max(hkv // size, 1) * hd
        k0 = kv_head * hd
        i = inter // size
        for layer in range(cfg.num_layers):
            p = f"layers.{layer}."
            for kind in ("weight", "bias"):
                fq, fk, fv = full[p + f"self_attn.qkv_proj.{kind}"].split([q_full, kv_full, kv_full])
                want = torch.cat([fq[rank * q : (rank + 1) * q], fk[k0 : k0 + kv], fv[k0 : k0 + kv]])
                assert torch.equal(shard[p + f"self_attn.qkv_proj.{kind}"], want)
                gate, up = full[p + f"mlp.gate_up_proj.{kind}"].chunk(2)
                want = torch.cat([gate[rank * i : (rank + 1) * i], up[rank * i : (rank + 1) * i]])
                assert torch.equal(shard[p + f"mlp.gate_up_proj.{kind}"], want)
            o, down = full[p + "self_attn.o_proj.weight"], full[p + "mlp.down_proj.weight"]
            assert torch.equal(shard[p + "self_attn.o_proj.weight"], o[:, rank * q : (rank + 1) * q])
            assert torch.equal(shard[p + "mlp.down_proj.weight"], down[:, rank * i : (rank + 1) * i])
            for whole in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "input_layernorm.weight"):
                assert torch.equal(shard[p + whole], full[p + whole])  # row-parallel biases: added once
        start, rows, real = vocab_shard(cfg.vocab_size, TPGroup(rank, size, CPU))
        for name in ("embed_tokens.weight", "lm_head.weight"):
            assert shard[name].shape[0] == rows
            assert torch.equal(shard[name][:real], full[name][start : start + real])
            assert not shard[name][real:].any()  # padding rows are zero
        assert model.weight_bytes < 0.6 * sum(t.numel() * t.element_size() for t in full.values()) * 2 / size


def test_a_rank_reads_only_slices_of_the_split_tensors(biased_model, monkeypatch):
    import engine.loader as loader

    whole: list[str] = []
    real_open = loader.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._cm = real_open(*args, **kwargs)

        def __enter__(self):
            f = self._cm.__enter__()
            get = f.get_tensor
            spy = self

            class F:
                def keys(self):
                    return f.keys()

                def get_slice(self, name):
                    return f.get_slice(name)

                def get_tensor(self, name):
                    whole.append(name)
                    return get(name)

            spy.f = F()
            return spy.f

        def __exit__(self, *exc):
            return self._cm.__exit__(*exc)

    monkeypatch.setattr(loader, "safe_open", Spy)
    load_model(biased_model, tp=TPGroup(1, 2, CPU))
    assert whole and all(n.endswith(("norm.weight", "o_proj.bias", "down_proj.bias")) for n in whole), whole


def test_config_and_weights_that_disagree_fail_by_name(model_factory, tmp_path):
    import json
    import shutil

    src = model_factory("llama", 62)
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["intermediate_size"] = 176  # the weights have 160 rows
    (dst / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LoadError, match=r"(gate|up|down)_proj.*config\.json and weights disagree"):
        load_model(dst, tp=TPGroup(0, 2, CPU))


def test_one_rank_group_does_nothing():
    tp = TPGroup.single("cpu")
    t = torch.arange(4.0)
    assert tp.all_reduce_(t) is t and torch.equal(t, torch.arange(4.0))
    assert tp.all_gather(t) is t
    obj = {"a": [1]}
    assert tp.broadcast_object(obj) is obj
    assert tp.agree_min([3, 1]) == [3, 1]
    tp.barrier()
    tp.startup_barrier()
    tp.close()
    assert (tp.rank, tp.size, tp.device) == (0, 1, CPU)


def test_rank_devices():
    assert rank_device("cpu", 3) == CPU
    if not torch.cuda.is_available():
        assert rank_device("auto", 1) == CPU
        with pytest.raises(RuntimeError):
            rank_device("cuda", 1)


@pytest.mark.parametrize(
    "field, value",
    [("tp_size", 0), ("tp_size", True), ("tp_size", 1.5), ("dist_timeout_s", 0), ("dist_timeout_s", float("nan")),
     ("dist_timeout_s", float("inf"))],
)  # fmt: skip
def test_engine_config_validates_tp_fields(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value}).validate()


def test_engine_needs_its_group_for_several_ranks():
    from engine.engine import Engine

    with pytest.raises(ValueError, match="TPGroup"):
        Engine(EngineConfig(tp_size=2, device="cpu"))
    with pytest.raises(ValueError, match="2 ranks but tp_size x cp_size is 1 x 1"):
        Engine(EngineConfig(device="cpu"), TPGroup(0, 2, CPU))


def test_flags_env_twins_and_launch(monkeypatch):
    from pdserve.cli import build_parser, engine_argv, engine_config

    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert (engine_config(args).tp_size, engine_config(args).dist_timeout_s) == (1, 120.0)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--tp-size", "2", "--dist-timeout", "7.5"])
    assert (engine_config(args).tp_size, engine_config(args).dist_timeout_s) == (2, 7.5)
    monkeypatch.setenv("PDSERVE_TP_SIZE", "4")
    monkeypatch.setenv("PDSERVE_DIST_TIMEOUT", "30")
    for role in ("prefill", "decode", "launch"):
        args = build_parser().parse_args([role])
        assert (args.tp_size, args.dist_timeout) == (4, 30.0)
    argv = engine_argv(build_parser().parse_args(["launch"]))
    assert argv[argv.index("--tp-size") + 1] == "4" and argv[argv.index("--dist-timeout") + 1] == "30.0"
    assert build_parser().parse_args(["prefill", *argv]).tp_size == 4
