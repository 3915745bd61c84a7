"""Loading from local Hugging Face directories: sharded checkpoints and clear errors for bad ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ConfigError, ModelConfig
from engine.loader import LoadError, load_model


@pytest.fixture
def model_dir(model_factory, tmp_path: Path) -> Path:
    src = model_factory("llama", 21)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint_loads_identically(model_dir: Path):
    whole = load_model(model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, fname))
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = load_model(model_dir)
    for (name, a), (_, b) in zip(whole.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_missing_directory():
    with pytest.raises(LoadError, match="does not exist"):
        load_model("/nonexistent/model")


def test_missing_and_corrupt_config(model_dir: Path):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "unsupported rope scaling 'yarn'",
        ),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "not divisible"),
        ({"hidden_size": None}, "missing required option 'hidden_size'"),
        ({"dtype": "int8"}, "unsupported dtype"),
    ],
)
def test_unsupported_config_options_are_named(model_dir: Path, changes: dict, message: str):
    edit_config(model_dir, **changes)
    with pytest.raises(ConfigError, match=message):
        load_model(model_dir)


def test_qwen2_sliding_window_is_refused():
    raw = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 8,
        "num_attention_heads": 2,
        "vocab_size": 4,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "use_sliding_window": True,
    }
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_dict(raw)


def test_corrupt_weights(model_dir: Path):
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LoadError, match="not a readable safetensors"):
        load_model(model_dir)


def test_no_weights(model_dir: Path):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LoadError, match=r"no \*\.safetensors.*\.bin checkpoints are not supported"):
        load_model(model_dir)


def test_missing_shard(model_dir: Path):
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(LoadError, match=r"missing: model-00002-of-00002\.safetensors"):
        load_model(model_dir)


def test_missing_tensor_and_wrong_shape(model_dir: Path):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(LoadError, match="missing 1 tensors"):
        load_model(model_dir)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(LoadError, match=r"has shape \(3, 3\)"):
        load_model(model_dir)


def test_unexpected_tensor(model_dir: Path):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.vision_tower.weight"] = torch.zeros(2)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(LoadError, match=r"unexpected tensor 'model\.vision_tower\.weight'"):
        load_model(model_dir)
