"""Text <-> token ids: the one tokenizer wrapper, shared by the engine, the servers' HTTP fronts and the router
(which counts a prompt's tokens to choose between local and remote prefill). Depends on transformers and
tokenizers only, never on the engine."""
