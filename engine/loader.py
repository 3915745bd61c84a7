"""Load a Llama-family model from a local Hugging Face directory (config.json + *.safetensors).

Under tensor parallelism each rank reads only its shard of each tensor (`safe_open(...).get_slice`: the rows
or columns it owns, see `_shard_of`), so a rank's memory holds about 1/N of the weights, never the whole.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from engine.config import ConfigError, ModelConfig
from engine.distributed import TPGroup
from engine.models import LlamaFamilyModel
from engine.models.parallel_layers import vocab_shard
from engine.models.rope import RotaryEmbedding
from engine.parallel import TPLayoutError, check_tp, even_range, kv_head_range

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# HF projection name -> (fused parameter, which slice of it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


class LoadError(ValueError):
    """A model directory that cannot be loaded; the message names the file and what to do."""


def check_model_tp(cfg: ModelConfig, tp_size: int, what: str = "the model", dp_attention: bool = False) -> None:
    """Raise TPLayoutError unless `tp_size` ranks can split `cfg` evenly (heads, KV heads, MLP rows; only MLP rows
    under DP attention, where every rank holds all heads); the vocabulary is padded, so any size splits it."""
    if not dp_attention:
        check_tp(cfg.num_heads, cfg.num_kv_heads, tp_size, what)
    if cfg.intermediate_size % tp_size:
        raise TPLayoutError(
            f"--tp-size {tp_size} does not divide the intermediate_size {cfg.intermediate_size} of {what}; "
            "use a TP size that divides it"
        )


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    tp: TPGroup | None = None,
    dp_attention: bool = False,
) -> LlamaFamilyModel:
    """The model (this rank's shard of it when `tp` has several ranks) on `device`. With `dp_attention` only the
    MLP is sharded over `tp`; attention, embedding and LM head are whole on every rank."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoadError(f"model directory {model_dir} does not exist (use a local HF directory or builtin:NAME)")
    cfg = ModelConfig.from_pretrained(model_dir)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    tp = tp if tp is not None else TPGroup.single(device)
    check_model_tp(cfg, tp.size, str(model_dir), dp_attention)
    device = torch.device(device)
    # Build without allocating or initialising (weights come from the checkpoint), then materialise.
    with torch.device("meta"):
        model = LlamaFamilyModel(cfg, tp, dp_attention)
    groups = _Groups(model.attn_tp, model.tp)
    model = model.to_empty(device=device).to(cfg.dtype)
    model.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings).to(device)

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in _read_tensors(model_dir, cfg, groups):
        target, part = _map_name(name, cfg)
        if target is None:
            continue
        if target not in params:
            raise LoadError(f"{model_dir}: unexpected tensor {name!r} for {cfg.architecture}")
        _copy_into(params[target], target, part, tensor, name, cfg, groups)
        loaded.add(f"{target}#{part}")

    expected = {f"{n}#{p}" for n, parts in _expected_parts(params) for p in parts}
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(m.split("#")[0] for m in missing[:5])
        raise LoadError(f"{model_dir}: checkpoint is missing {len(missing)} tensors (e.g. {shown})")
    return model.eval()


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index} is not a valid safetensors index ({e})") from e
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise LoadError(f"{model_dir}: shards listed in {INDEX_FILE} are missing: {', '.join(absent)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = (
            " (PyTorch .bin checkpoints are not supported: convert to safetensors)"
            if any(model_dir.glob("*.bin"))
            else ""
        )
        raise LoadError(f"{model_dir}: no *.safetensors weights found{hint}")
    return files


class _Groups(NamedTuple):
    """The group each part of the model is split over: attention and vocabulary, and the MLP (the same group but
    under DP attention, where attention and vocabulary are whole on every rank)."""

    attn: TPGroup
    mlp: TPGroup


def _read_tensors(model_dir: Path, cfg: ModelConfig, groups: _Groups) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, this rank's part of the tensor) for every tensor of the checkpoint."""
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shard = _shard_of(name, cfg, groups)
                    yield name, f.get_tensor(name) if shard is None else _read_shard(f, name, shard)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LoadError(f"{path} is not a readable safetensors file ({e}); re-download it") from e


# (dim, start, count, full size along dim) of the part of an HF tensor one rank owns
_Shard = tuple[int, int, int, int]


def _shard_of(name: str, cfg: ModelConfig, groups: _Groups) -> _Shard | None:
    """The rows (column-parallel, vocabulary) or columns (row-parallel) of HF tensor `name` this rank reads;
    None for a tensor this rank holds whole (norms, row-parallel biases, anything of a one-rank group)."""
    hd = cfg.head_dim
    m = _LAYER.match(name)
    tp = groups.mlp if m is not None and m.group(2).startswith("mlp.") else groups.attn
    if tp.size == 1:
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, _, real = vocab_shard(cfg.vocab_size, tp)
        return 0, start, real, cfg.vocab_size
    if m is None:
        return None
    _, module, kind = m.groups()
    q_heads = cfg.num_heads // tp.size
    if module == "self_attn.q_proj":
        return 0, tp.rank * q_heads * hd, q_heads * hd, cfg.num_heads * hd
    if module in ("self_attn.k_proj", "self_attn.v_proj"):
        kv = kv_head_range(cfg.num_kv_heads, tp.size, tp.rank)
        return 0, kv.start * hd, kv.count * hd, cfg.num_kv_heads * hd
    if module == "self_attn.o_proj" and kind == "weight":
        return 1, tp.rank * q_heads * hd, q_heads * hd, cfg.num_heads * hd
    inter = cfg.intermediate_size
    if module in ("mlp.gate_proj", "mlp.up_proj"):
        return (0, *even_range(inter, tp.size, tp.rank), inter)
    if module == "mlp.down_proj" and kind == "weight":
        return (1, *even_range(inter, tp.size, tp.rank), inter)
    return None


def _read_shard(f: object, name: str, shard: _Shard) -> torch.Tensor:
    """Only this rank's part of `name`, read from the file (the rest is never loaded)."""
    dim, start, count, full = shard
    sl = f.get_slice(name)  # type: ignore[attr-defined]
    shape = tuple(sl.get_shape())
    if len(shape) <= dim or shape[dim] != full:
        raise LoadError(
            f"tensor {name!r} has shape {shape}, config implies {full} along dimension {dim}; "
            "config.json and weights disagree"
        )
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + count)
    return sl[tuple(index)]


def _map_name(name: str, cfg: ModelConfig) -> tuple[str | None, int]:
    """HF tensor name -> (our parameter name, slice index within a fused parameter); None to skip."""
    if _IGNORED.search(name):
        return None, 0
    if name == "lm_head.weight":
        # Some tied checkpoints still store lm_head; it equals the embedding, so skip it.
        return (None, 0) if cfg.tie_word_embeddings else ("lm_head.weight", 0)
    if name in ("model.embed_tokens.weight", "model.norm.weight"):
        return name.removeprefix("model."), 0
    m = _LAYER.match(name)
    if m is None:
        raise LoadError(f"unexpected tensor {name!r} for {cfg.architecture}")
    layer, module, kind = m.groups()
    if module in _FUSED:
        fused, part = _FUSED[module]
        return f"layers.{layer}.{fused}.{kind}", part
    return f"layers.{layer}.{module}.{kind}", 0


def _split_sizes(param_name: str, cfg: ModelConfig, groups: _Groups) -> list[int] | None:
    """The rows of q, k, v (or gate, up) within this rank's fused parameter."""
    if "qkv_proj" in param_name:
        tp = groups.attn
        kv = kv_head_range(cfg.num_kv_heads, tp.size, tp.rank).count * cfg.head_dim
        return [cfg.num_heads // tp.size * cfg.head_dim, kv, kv]
    if "gate_up_proj" in param_name:
        inter = cfg.intermediate_size // groups.mlp.size
        return [inter, inter]
    return None


def _expected_parts(params: dict[str, torch.nn.Parameter]) -> Iterator[tuple[str, range]]:
    for name in params:
        fused = "qkv_proj" in name or "gate_up_proj" in name
        yield name, range(3 if "qkv_proj" in name else 2) if fused else range(1)


def _copy_into(
    param: torch.nn.Parameter,
    target_name: str,
    part: int,
    tensor: torch.Tensor,
    name: str,
    cfg: ModelConfig,
    groups: _Groups,
) -> None:
    sizes = _split_sizes(target_name, cfg, groups)
    tp = groups.attn
    target = param.data
    if sizes is not None:
        offset = sum(sizes[:part])
        target = target.narrow(0, offset, sizes[part])
    if target_name in ("embed_tokens.weight", "lm_head.weight") and tp.size > 1:
        # the vocabulary is padded to a multiple of the ranks: rows past the real tokens are zero
        with torch.no_grad():
            target.zero_()
        target = target.narrow(0, 0, vocab_shard(cfg.vocab_size, tp)[2])
    if tuple(target.shape) != tuple(tensor.shape):
        raise LoadError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, config implies {tuple(target.shape)}; "
            "config.json and weights disagree"
        )
    with torch.no_grad():
        target.copy_(tensor)


__all__ = ["ConfigError", "LoadError", "TPLayoutError", "check_model_tp", "load_model", "weight_files"]
