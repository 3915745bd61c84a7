"""Model configuration: the subset of a Hugging Face `config.json` the engine understands.

Parsing is strict on purpose: a config option we do not implement must fail loudly at load time,
not silently produce different tokens from the reference implementation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.two_batch import check_threshold

# architecture name in config.json -> model family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


class ConfigError(ValueError):
    """A model config the engine cannot run; the message names the offending option."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model directory needs a Hugging Face config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download or regenerate the model") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"pdserve runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: missing required option {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} not divisible by num_key_value_heads {kv_heads}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
        if int(raw.get("pretraining_tp", 1)) != 1:
            raise ConfigError(f"{source}: unsupported pretraining_tp {raw['pretraining_tp']}; only 1")

        sliding = _sliding_window(raw, family, source)
        attention_bias = bool(raw.get("attention_bias", False))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four.
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=sliding,
            dtype=parse_dtype(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs use rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    try:
        factor = float(params["factor"])
    except KeyError:
        raise ConfigError(f"{source}: rope scaling {rope_type!r} needs 'factor'") from None
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(raw: dict[str, Any], family: str, source: str) -> int | None:
    if family == "qwen2":
        # Qwen2 applies its window only to some layers (max_window_layers); not implemented.
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 use_sliding_window=true is not supported")
        return None
    if family == "mistral":
        window = raw.get("sliding_window")
        return int(window) if window else None
    return None


@dataclass
class EngineConfig:
    """How to run a model: everything a server or the colocated engine is started with."""

    model: str = "builtin:tiny-llama"  # local HF directory or builtin:NAME
    dtype: str | None = None  # None: the checkpoint's dtype
    device: str = "auto"
    attention_backend: str = "auto"
    page_size: int = 16
    kv_cache_gb: float | None = None  # None: 0.5 GiB on CPU, 85% of free memory on CUDA
    num_pages: int | None = None  # overrides kv_cache_gb (tests use small pools)
    max_batch_size: int = 64
    max_prefill_tokens: int = 8192
    context_length: int | None = None  # None: the model's max_position_embeddings
    disable_cuda_graph: bool = False  # decode graphs are captured only on CUDA with a capturable backend
    cuda_graph_max_bs: int = 64  # largest decode batch replayed from a graph (capped by max_batch_size)
    skip_warmup: bool = False  # skip running each kind of forward once at start-up (tests, quick tools)
    tp_size: int = 1  # tensor-parallel ranks (one process and one device each; engine/distributed.py)
    # Context-parallel prefill ranks (engine/cp_forward.py): each holds the whole model and computes its zigzag
    # share of every eligible prefill batch. Not combined with tp_size > 1.
    cp_size: int = 1
    # DP attention (engine/dp_attention.py): dp_size ranks (= tp_size) each run attention for their own requests
    # with all heads and their own KV pool and queue; the MLP stays tensor-parallel over the same ranks
    dp_size: int = 1
    enable_dp_attention: bool = False
    dist_timeout_s: float = 120.0  # a collective waiting longer for a peer fails (a dead or hung rank)
    # Two-batch overlap (engine/two_batch_forward.py): a batch runs as two micro-batches whose stages interleave, so
    # one's all-reduce is in flight while the other computes. The threshold: below this share of the tokens on a
    # side, the sequence-boundary split gives way to the two-chunk split (0 never cuts a sequence; at most 0.5).
    enable_two_batch_overlap: bool = False
    tbo_token_distribution_threshold: float = 0.48
    # Benchmarking aid, off by default: every model all-reduce completes no sooner than this after its launch
    emulated_collective_latency_ms: float = 0.0
    # Admission (engine/headroom.py): "need" admits by current need plus an estimate of further output and retracts
    # under pressure; "worst_case" reserves prompt + max_new_tokens up front and never retracts.
    admission_policy: str = "need"
    init_headroom_ratio: float = 0.7  # the estimate before any request finished (SGLang's init_new_token_ratio)
    min_headroom_ratio: float = 0.1  # the estimate never goes below this
    # Prefill tokens carried by one MIXED forward beside the running decodes (bounds the decode step's latency);
    # 0: no MIXED batches, prefills run alone and pause decoding
    mixed_chunk_size: int = 512
    # Most prompt tokens one prefill forward computes: longer prompts run as several chunks, each on the KV of the
    # ones before (bounds activation memory and how long other prompts wait); 0: every prompt in one forward.
    # 512: bench/prefill.py on CPU (short prompts during an 8K one 5.5x faster than unchunked, the long forward ~6%
    # slower, peak activations 62 vs 350 MiB; 2048 gave only 1.1-1.8x); re-measure on a GPU, where 1024+ may pay
    chunked_prefill_size: int = 512

    def validate(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")
        self._validate_parallel()
        self._validate_scheduling()
        if self.dtype is not None:
            parse_dtype(self.dtype)

    @property
    def world_size(self) -> int:
        """Processes (ranks) one engine runs on: its TP ranks, or its CP ranks."""
        return self.tp_size * self.cp_size

    @property
    def dp_attention(self) -> bool:
        return self.enable_dp_attention and self.dp_size > 1

    def _validate_parallel(self) -> None:
        for name in ("tp_size", "cp_size", "dp_size"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
        if self.cp_size > 1 and self.tp_size > 1:
            raise ValueError(
                f"cp_size {self.cp_size} with tp_size {self.tp_size}: context and tensor parallelism do not combine "
                "yet; use one of them (--cp-size N with --tp-size 1, or --tp-size N with --cp-size 1)"
            )
        self._validate_dp()
        if self.cp_size > 1 and self.enable_two_batch_overlap:
            raise ValueError("two-batch overlap does not run with context parallelism: drop one of them")
        check_threshold(self.tbo_token_distribution_threshold)
        if not 0.0 <= self.emulated_collective_latency_ms < float("inf"):
            raise ValueError(f"emulated_collective_latency_ms must be >= 0, got {self.emulated_collective_latency_ms}")
        if not self.dist_timeout_s > 0 or self.dist_timeout_s == float("inf"):
            raise ValueError(f"dist_timeout_s must be a finite number of seconds > 0, got {self.dist_timeout_s}")

    def _validate_dp(self) -> None:
        if self.dp_size > 1 and not self.enable_dp_attention:
            raise ValueError(
                f"dp_size {self.dp_size} needs --enable-dp-attention (data-parallel replicas without it are separate "
                "servers: start one per replica and let the router spread requests)"
            )
        if self.enable_dp_attention and self.dp_size < 2:
            raise ValueError("--enable-dp-attention needs --dp-size N (N > 1) with --tp-size N")
        if self.dp_attention and self.dp_size != self.tp_size:
            raise ValueError(
                f"dp_size {self.dp_size} with tp_size {self.tp_size}: DP attention runs attention data-parallel over "
                f"the tensor-parallel ranks; give both the same N (--tp-size {self.dp_size} --dp-size {self.dp_size})"
            )
        if self.dp_attention and self.cp_size > 1:
            raise ValueError("DP attention does not combine with context parallelism: drop one of them")

    def _validate_scheduling(self) -> None:
        if self.admission_policy not in ("need", "worst_case"):
            raise ValueError(f"admission_policy must be 'need' or 'worst_case', got {self.admission_policy!r}")
        for name in ("init_headroom_ratio", "min_headroom_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mixed_chunk_size < 0:
            raise ValueError(f"mixed_chunk_size must be >= 0 (0 turns MIXED batches off), got {self.mixed_chunk_size}")
        c = self.chunked_prefill_size
        if c < 0 or c % self.page_size:
            raise ValueError(
                f"chunked_prefill_size must be 0 (off) or a positive multiple of page_size {self.page_size}, "
                f"got {c}: each chunk must start on a page boundary"
            )
