"""Built-in random-weight models: deterministic HF-format generation, caching, and loadability."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from engine import builtin
from engine.builtin import BuiltinSpec, get_spec, list_builtin, resolve_model
from tokenization.tokenizer import Tokenizer, build_byte_level_tokenizer

TINY = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def test_list_and_specs() -> None:
    assert list_builtin() == ["tiny-llama", "tiny-qwen2", "tiny-mistral", "bench-llama", "tiny-llama-mqa"]
    specs = [get_spec(n) for n in list_builtin()]
    assert len({s.seed for s in specs}) == len(specs)
    assert get_spec("builtin:bench-llama").num_layers >= 24
    assert get_spec("bench-llama").num_shards > 1
    for s in specs:
        assert s.num_heads % s.num_kv_heads == 0
    assert get_spec("tiny-qwen2").tie_word_embeddings
    assert get_spec("tiny-llama").rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }


def test_unknown_builtin_lists_known(cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown built-in model") as info:
        resolve_model("builtin:nope", cache)
    for name in list_builtin():
        assert f"builtin:{name}" in str(info.value)


def test_plain_paths_pass_through(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path / "some" / "model")) == tmp_path / "some" / "model"
    assert resolve_model("org/model-name") == Path("org/model-name")


def test_cache_key_tracks_spec() -> None:
    spec = get_spec("tiny-llama")
    assert spec.dir_name.startswith("tiny-llama-")
    assert dataclasses.replace(spec, seed=spec.seed + 1).dir_name != spec.dir_name
    assert dataclasses.replace(spec).dir_name == spec.dir_name


def test_generation_deterministic_and_cached(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = resolve_model("builtin:tiny-llama", cache)
    assert first.parent == cache / "models"
    assert "builtin:tiny-llama" in capsys.readouterr().err  # progress goes to stderr

    # A second, independent generation writes byte-identical files.
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    other = resolve_model("builtin:tiny-llama")
    assert other.parent == tmp_path / "models" and other.name == first.name
    capsys.readouterr()
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (first / f).read_bytes() == (other / f).read_bytes(), f

    # Third call: reused as is, nothing is generated.
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    calls: list[BuiltinSpec] = []
    monkeypatch.setattr(builtin, "generate_model", lambda spec, out: calls.append(spec))
    assert resolve_model("builtin:tiny-llama", cache) == first
    assert calls == []
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""


def test_losing_a_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec("tiny-mistral")
    real = builtin.generate_model

    def racing(s: BuiltinSpec, out: Path) -> None:
        real(s, out)
        # Another process finishes first and renames its complete directory into place.
        winner = out.parent / "winner"
        winner.mkdir()
        real(s, winner)
        (winner / "from-winner").touch()
        os.rename(winner, out.parent / s.dir_name)

    monkeypatch.setattr(builtin, "generate_model", racing)
    got = builtin.ensure_builtin(spec, tmp_path)
    assert (got / "from-winner").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [spec.dir_name]  # no temp dirs left


def test_incomplete_directory_is_not_used(tmp_path: Path) -> None:
    spec = get_spec("tiny-mistral")
    (tmp_path / "models" / spec.dir_name).mkdir(parents=True)
    with pytest.raises(ValueError, match="not a complete"):
        builtin.ensure_builtin(spec, tmp_path)


def test_hf_files(cache: Path) -> None:
    d = resolve_model("builtin:tiny-qwen2", cache)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["model_type"] == "qwen2"
    assert cfg["vocab_size"] == 512
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 3]  # <|end_of_text|>, <|im_end|>
    assert gen["bos_token_id"] == 0
    tok = Tokenizer.from_pretrained(d)
    assert tok.eos_token_ids == [1, 3]
    assert tok.vocab_size == 512
    weights = _weights(d)
    assert "lm_head.weight" not in weights  # tied: HF re-ties it on load
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    assert all(t.dtype == torch.float32 for t in weights.values())
    with safe_open(str(d / "model.safetensors"), "pt") as sf:
        assert sf.metadata() == {"format": "pt"}


@pytest.mark.parametrize("name", TINY)
def test_autotokenizer_matches_builtin_tokenizer(cache: Path, name: str) -> None:
    # transformers 5 loads qwen2 directories with Qwen2Tokenizer, which rebuilds the pipeline from
    # vocab/merges; the qwen2-style tokenizer makes that reconstruction identical to the files.
    d = resolve_model(f"builtin:{name}", cache)
    style = "qwen2" if name == "tiny-qwen2" else "gpt2"
    ours = build_byte_level_tokenizer(style)
    loaded = transformers.AutoTokenizer.from_pretrained(str(d))
    assert len(loaded) == 512
    assert loaded.get_vocab() == ours.get_vocab()
    assert loaded.unk_token is None
    texts = ["Hello, world! 2024 numbers", "e\u0301 café 日本語 😀", "<|im_start|>user\nhi<|im_end|>\n", "a\n\n  b"]
    for text in texts:
        assert loaded.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False), text
    wrapped = Tokenizer.from_pretrained(d)
    assert wrapped.vocab_size == 512
    assert wrapped.decode(wrapped.encode("plain text, 123")) == "plain text, 123"


@pytest.mark.parametrize("name", TINY)
def test_hf_loads_and_predicts_peaked(cache: Path, name: str) -> None:
    d = resolve_model(f"builtin:{name}", cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    spec = get_spec(name)
    assert model.config.num_hidden_layers == spec.num_layers
    assert len(hf_tok) == model.config.vocab_size == 512
    # Every stored tensor is what HF uses (nothing silently re-initialised).
    state = model.state_dict()
    for k, v in _weights(d).items():
        assert torch.equal(state[k], v), k

    ids = hf_tok.encode("The quick brown fox jumps over the lazy dog, and then it", add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert torch.isfinite(logits).all()
    top1 = logits.softmax(-1).max(-1).values
    # Uniform would be 1/512; the weight scales are chosen so greedy decoding has clear winners.
    assert top1.mean() > 0.4, top1
    # The model must not just echo its input (that would hide attention/KV-cache bugs).
    assert (logits.argmax(-1) == torch.tensor(ids)).float().mean() < 0.2


def test_sharded_layout_matches_single_file(cache: Path, tmp_path: Path) -> None:
    single = resolve_model("builtin:tiny-llama", cache)
    spec = dataclasses.replace(get_spec("tiny-llama"), name="tiny-llama-sharded", num_shards=3)
    sharded = builtin.ensure_builtin(spec, tmp_path)
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    # Weights depend only on (seed, name), not on the file layout.
    a, b = _weights(single), _weights(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(sharded))
    assert torch.equal(model.state_dict()["lm_head.weight"], a["lm_head.weight"])


def test_bench_llama_sharded_index(tmp_path: Path) -> None:
    # ~3 s and ~270 MB: the real bench model, checked without loading it into HF.
    d = resolve_model("builtin:bench-llama", tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in d.glob("*.safetensors")) == files

    config = transformers.AutoConfig.from_pretrained(str(d))
    assert config.num_hidden_layers >= 24
    shapes = builtin.parameter_shapes(config)
    assert set(weight_map) == set(shapes)
    total = 0
    for f in files:
        with safe_open(str(d / f), "pt") as sf:
            keys = set(sf.keys())
            assert keys == {k for k, v in weight_map.items() if v == f}
            for k in keys:
                sl = sf.get_slice(k)
                assert tuple(sl.get_shape()) == shapes[k]
                total += 4 * int(torch.tensor(sl.get_shape()).prod())
    assert index["metadata"]["total_size"] == total
