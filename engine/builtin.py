"""Built-in random-weight models, generated deterministically in Hugging Face format.

No weights can be downloaded where pdserve is built and tested, so ``builtin:NAME`` names a small
model that is generated on first use into a cache directory: ``config.json`` (written by
transformers' own config classes), ``generation_config.json``, the built-in byte-level BPE
tokenizer, and safetensors weights with HF parameter names. Because the output is an ordinary HF
checkpoint, the same loader that serves real checkpoints serves these, and HF transformers can
load them as a reference implementation in tests.

The weights are drawn here from per-parameter seeded generators, not by transformers' init code,
so they are identical across transformers versions. Their scale is deliberately larger than a
trained model's would be: it makes next-token distributions peaked, so greedy decoding has no
near-ties and different correct implementations agree token for token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tokenization.tokenizer import EOS_TOKEN, IM_END_TOKEN, TOKENIZER_FINGERPRINT, build_byte_level_tokenizer

BUILTIN_PREFIX = "builtin:"

# Bump whenever generation changes what it writes (weight init, file layout, config fields), so
# caches made by older code are not reused: it is part of every model directory's name.
GENERATOR_VERSION = 1

# Weight scales beyond the plain "std 1/sqrt(in_features)" rule, chosen by measuring the tiny models.
# With the plain rule the residual stream is dominated by the token embedding (std 1) and:
#  - untied models give logits of std ~1 over 512 tokens: mean top-1 prob ~0.03 and top-2 gaps
#    down to ~1e-3, i.e. near-ties that make greedy decoding implementation-dependent;
#  - the tied model (qwen2) predicts its own input token (argmax == input ~99%) and greedy
#    generation is a one-token loop, which would hide attention/KV-cache bugs.
# Scaling the residual-branch outputs (o_proj, down_proj) makes attention and MLP dominate the
# embedding, so predictions depend on the context; scaling lm_head sets the logit scale. Measured:
# mean top-1 prob 0.6-0.8, median top-2 logit gap 1.1-2.4, changing the first of 24 tokens changes
# the last position's argmax ~85% of the time, greedy output is not a loop.
RESIDUAL_OUT_GAIN = 15.0
LM_HEAD_GAIN = 6.0

# Written last into a generated directory; its presence marks the directory as ours and complete.
MARKER_FILE = "pdserve_builtin.json"

ModelType = Literal["llama", "qwen2", "mistral"]


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    model_type: ModelType
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    sliding_window: int | None
    seed: int
    dtype: str = "float32"
    rms_norm_eps: float = 1e-5
    # Weight files to write; > 1 writes model-0000i-of-0000n.safetensors plus the index, which
    # exercises the loader's sharded path the way real multi-GB checkpoints do.
    num_shards: int = 1
    # None: the tokenizer's 512. Larger (as in many real checkpoints): ids no text encodes to, decoding to "".
    vocab_size: int | None = None

    def cache_key(self) -> str:
        """Short hash of everything that determines the generated files."""
        spec = {k: v for k, v in dataclasses.asdict(self).items() if not (k == "vocab_size" and v is None)}
        payload = json.dumps(
            {
                "spec": spec,
                "generator": GENERATOR_VERSION,
                "init": [RESIDUAL_OUT_GAIN, LM_HEAD_GAIN],
                "tokenizer": TOKENIZER_FINGERPRINT,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.cache_key()}"


_LLAMA3_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}

_SPECS: dict[str, BuiltinSpec] = {
    s.name: s
    for s in (
        BuiltinSpec(
            name="tiny-llama",
            model_type="llama",
            hidden_size=128,
            intermediate_size=352,
            num_layers=6,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_SCALING,
            sliding_window=None,
            seed=1001,
        ),
        BuiltinSpec(
            name="tiny-qwen2",
            model_type="qwen2",
            hidden_size=128,
            intermediate_size=320,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            rope_scaling=None,
            sliding_window=None,
            seed=2002,
        ),
        BuiltinSpec(
            name="tiny-mistral",
            model_type="mistral",
            hidden_size=128,
            intermediate_size=256,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling=None,
            sliding_window=None,
            seed=3003,
        ),
        BuiltinSpec(
            name="bench-llama",
            model_type="llama",
            hidden_size=512,
            intermediate_size=1408,
            num_layers=24,
            num_heads=8,
            num_kv_heads=2,
            head_dim=64,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=None,
            sliding_window=None,
            seed=4004,
            num_shards=3,
        ),
        # TP tests: 1 KV head (replicated at TP > 1), an odd vocabulary (padded), 8 query heads (TP 2, 4, 8)
        BuiltinSpec(
            name="tiny-llama-mqa",
            model_type="llama",
            hidden_size=128,
            intermediate_size=384,
            num_layers=4,
            num_heads=8,
            num_kv_heads=1,
            head_dim=16,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling=None,
            sliding_window=None,
            seed=5005,
            vocab_size=515,
        ),
    )
}


def list_builtin() -> list[str]:
    return list(_SPECS)


def get_spec(name: str) -> BuiltinSpec:
    """Spec for a built-in name, with or without the ``builtin:`` prefix."""
    short = name.removeprefix(BUILTIN_PREFIX)
    try:
        return _SPECS[short]
    except KeyError:
        known = ", ".join(BUILTIN_PREFIX + n for n in _SPECS)
        raise ValueError(f"unknown built-in model {name!r}; known built-in models: {known}") from None


def default_cache_dir() -> Path:
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve"


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Directory of a model: ``builtin:NAME`` is generated on first use; anything else is a path.

    Paths are returned unchanged (the loader checks them and reports what is wrong).
    """
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return Path(name_or_path)
    return ensure_builtin(get_spec(name_or_path), cache_dir)


def ensure_builtin(spec: BuiltinSpec, cache_dir: Path | None = None) -> Path:
    """The generated directory for `spec`, generating it only if no complete one exists yet."""
    models_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    final = models_dir / spec.dir_name
    if _is_complete(final, spec):
        return final
    if final.exists():
        if _is_complete(final, spec):  # another process renamed its copy into place just now
            return final
        # Only complete directories are ever renamed into place, so this is not a half-written
        # one of ours; refuse to guess rather than delete something we do not own.
        raise ValueError(
            f"{final} exists but is not a complete pdserve built-in model (no {MARKER_FILE}); "
            "delete it to have it regenerated"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    # Generate beside the destination (same filesystem) so the final rename is atomic: readers
    # and racing generators only ever see a missing or a complete directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.dir_name}-", dir=models_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by other users
    try:
        generate_model(spec, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (rename onto a non-empty directory fails); use theirs.
            if not _is_complete(final, spec):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_complete(path: Path, spec: BuiltinSpec) -> bool:
    marker = path / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("cache_key") == spec.cache_key()
    except (OSError, ValueError):
        return False


# -- generation -------------------------------------------------------------------------------------

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _progress(spec: BuiltinSpec, start: float, message: str) -> None:
    # stderr, not logging: generation happens once, often before logging is configured, and bench-llama
    # takes long enough that silence would look like a hang.
    print(f"[pdserve] {BUILTIN_PREFIX}{spec.name}: {message} ({time.monotonic() - start:.1f}s)", file=sys.stderr)
    sys.stderr.flush()


def build_config(spec: BuiltinSpec, vocab_size: int, bos_token_id: int, eos_token_id: int) -> Any:
    """The transformers config object for `spec` (LlamaConfig / Qwen2Config / MistralConfig)."""
    import transformers

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "hidden_act": "silu",
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "architectures": [_ARCHITECTURES[spec.model_type]],
    }
    if spec.rope_scaling is not None:
        common["rope_scaling"] = dict(spec.rope_scaling)
    if spec.model_type == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif spec.model_type == "qwen2":
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False, sliding_window=spec.sliding_window)
    elif spec.model_type == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=spec.sliding_window)
    else:  # pragma: no cover - guarded by the Literal type and the spec table
        raise ValueError(f"unsupported model_type {spec.model_type!r}")
    # Set after construction: the constructor keyword is `dtype` in transformers 5 but `torch_dtype`
    # in 4.x, while the attribute works in both and is what save_pretrained writes.
    cfg.dtype = spec.dtype
    return cfg


def parameter_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes for `config`, read off a model built on the meta device."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        # Tied checkpoints store only the input embedding; HF re-ties lm_head on load.
        shapes.pop("lm_head.weight", None)
    return shapes


def init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic float32 values for one parameter, independent of every other parameter."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("embed_tokens.weight"):
        return noise
    if "norm" in name and len(shape) == 1:
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.02 * noise
    if name.endswith(".weight") and len(shape) == 2:
        # Linear weights are (out_features, in_features): std 1/sqrt(in) keeps activations O(1),
        # scaled up where the model would otherwise be degenerate (see RESIDUAL_OUT_GAIN, LM_HEAD_GAIN).
        gain = 1.0
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            gain = RESIDUAL_OUT_GAIN
        elif name == "lm_head.weight":
            gain = LM_HEAD_GAIN
        return noise * (gain / math.sqrt(shape[1]))
    raise ValueError(f"no initialisation rule for parameter {name!r} with shape {shape}")


def _split_shards(names: list[str], shapes: dict[str, tuple[int, ...]], num_shards: int) -> list[list[str]]:
    """Consecutive groups of roughly equal byte size (real checkpoints shard in parameter order)."""
    sizes = [math.prod(shapes[n]) for n in names]
    target = sum(sizes) / num_shards
    shards: list[list[str]] = [[]]
    acc = 0
    for name, size in zip(names, sizes, strict=True):
        if shards[-1] and acc + size / 2 > target * len(shards) and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(name)
        acc += size
    return shards


def _iter_tensors(
    names: list[str], shapes: dict[str, tuple[int, ...]], seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, init_tensor(name, shapes[name], seed).contiguous()


def generate_model(spec: BuiltinSpec, out_dir: Path) -> None:
    """Write the complete HF model directory for `spec` into the existing, empty `out_dir`."""
    import transformers
    from safetensors.torch import save_file

    start = time.monotonic()
    out_dir = Path(out_dir)
    _progress(spec, start, f"generating {spec.dir_name} under {out_dir.parent}")

    # qwen2 directories get the pipeline transformers will load them with anyway (see tokenization.tokenizer).
    tokenizer = build_byte_level_tokenizer("qwen2" if spec.model_type == "qwen2" else "gpt2")
    tokenizer.save_pretrained(str(out_dir))
    vocab = tokenizer.get_vocab()
    bos_id = int(tokenizer.bos_token_id)
    eos_ids = [int(vocab[EOS_TOKEN]), int(vocab[IM_END_TOKEN])]

    vocab_size = max(spec.vocab_size or 0, len(tokenizer))
    config = build_config(spec, vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_ids[0])
    config.save_pretrained(str(out_dir))
    # Both <|end_of_text|> (plain completion) and <|im_end|> (end of a chat turn) stop generation.
    gen_config = transformers.GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=int(tokenizer.pad_token_id)
    )
    gen_config.save_pretrained(str(out_dir))
    _progress(spec, start, "wrote config and tokenizer")

    shapes = parameter_shapes(config)
    names = list(shapes)
    metadata = {"format": "pt"}
    if spec.num_shards <= 1:
        save_file(dict(_iter_tensors(names, shapes, spec.seed)), str(out_dir / "model.safetensors"), metadata)
        _progress(spec, start, "wrote model.safetensors")
    else:
        groups = _split_shards(names, shapes, spec.num_shards)
        weight_map: dict[str, str] = {}
        total_size = 0
        for i, group in enumerate(groups, start=1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = dict(_iter_tensors(group, shapes, spec.seed))
            save_file(tensors, str(out_dir / fname), metadata)
            for name, t in tensors.items():
                weight_map[name] = fname
                total_size += t.numel() * t.element_size()
            del tensors  # one shard in memory at a time
            _progress(spec, start, f"wrote {fname}")
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    marker = {
        "name": spec.name,
        "cache_key": spec.cache_key(),
        "spec": dataclasses.asdict(spec),
        "generator_version": GENERATOR_VERSION,
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _progress(spec, start, "done")


__all__ = [
    "BUILTIN_PREFIX",
    "GENERATOR_VERSION",
    "BuiltinSpec",
    "build_config",
    "default_cache_dir",
    "ensure_builtin",
    "generate_model",
    "get_spec",
    "list_builtin",
    "resolve_model",
]
