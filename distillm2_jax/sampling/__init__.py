"""Token sampling: logit filters (`filters`) and the compiled prefill + decode loop (`decode`).

The user-facing API (bucketing, batching, progress, result records, JSONL output) is
`distillm2_jax.generate`; see docs/generation.md.
"""
from distillm2_jax.sampling.decode import (
    GREEDY,
    BatchOutput,
    DecodeCache,
    DecodeState,
    SamplingConfig,
    decode,
    forward_cached,
    generate_batch,
    init_decode_cache,
    next_token,
    prefill,
    row_keys_from_ids,
    sample_logits,
    stop_id_array,
    unstack_layers,
    unstack_layers_jit,
)
from distillm2_jax.sampling.filters import (
    apply_temperature,
    categorical,
    filter_logits,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GREEDY", "BatchOutput", "DecodeCache", "DecodeState", "SamplingConfig", "apply_temperature",
    "categorical", "decode", "filter_logits", "forward_cached", "generate_batch",
    "init_decode_cache", "next_token", "prefill", "row_keys_from_ids", "sample_logits",
    "stop_id_array", "top_k_filter", "top_p_filter", "unstack_layers", "unstack_layers_jit",
]
