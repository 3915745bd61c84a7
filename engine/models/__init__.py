"""Model definitions. One decoder implementation covers the Llama family (Llama, Qwen2, Mistral)."""

from engine.models.llama import LlamaFamilyModel

__all__ = ["LlamaFamilyModel"]
