"""Shared fixtures: small random Llama-family checkpoints in Hugging Face format, written on demand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def write_random_model(out_dir: Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """A random-weight model of `family` with the project's byte-level tokenizer, in HF format."""
    import transformers
    from safetensors.torch import save_file

    from engine.builtin import init_tensor, parameter_shapes
    from tokenization.tokenizer import build_byte_level_tokenizer

    tok = build_byte_level_tokenizer()
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        # no eos: parity runs generate a fixed number of tokens on both sides
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    cfg = getattr(transformers, _CONFIG_CLASSES[family])(**kwargs)
    cfg.architectures = [cfg.__class__.__name__.replace("Config", "ForCausalLM")]
    cfg.dtype = "float32"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    shapes = parameter_shapes(cfg)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    tensors = {name: init_tensor(name, shape, seed).contiguous() for name, shape in shapes.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def make(family: str, seed: int = 0, **overrides: Any) -> Path:
        key = f"{family}-{seed}-{sorted(overrides.items())}"
        if key not in made:
            made[key] = write_random_model(tmp_path_factory.mktemp(family), family, seed, **overrides)
        return made[key]

    return make


@pytest.fixture
def make_router():
    """`make(prefill_urls, decode_urls, **RouterConfig fields) -> url`: a real router app in a uvicorn thread,
    stopped after the test (tests/test_router.py and tests/test_router_legs.py)."""
    from router.app import create_app
    from router.config import RouterConfig
    from tests.test_router import ServerThread

    started: list[ServerThread] = []

    def make(prefill: list[Any], decode: list[str], **kw: Any) -> str:
        kw.setdefault("health_check_interval_s", 0)  # the periodic loop off: what is tested is the router's own
        srv = ServerThread(create_app(RouterConfig(prefill=prefill, decode=decode, **kw)))
        started.append(srv)
        return srv.url

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def srv():
    """A ready HTTP front over the stand-in scheduler (tests/front_standin.py), one per test module; a module that
    needs other settings defines its own `srv`."""
    from tests.front_standin import Server

    s = Server()
    s.make_ready()
    yield s
    s.close()
