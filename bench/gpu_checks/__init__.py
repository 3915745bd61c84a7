"""The checks of `bench/gpu_check.py`: `report` (bookkeeping, pure Python), `common` (engines, prompts,
comparisons), `numerics` (logits and tokens), `speed` (syncs, throughput), `kv_transfer` (KV over real engines)."""
