"""Token sampling: logit filters (`filters`), the compiled slot sampler (`decode`) and
speculative decoding with a draft model over the same slots (`speculative`).

The loop runs the model's own forward with a KV cache (`models.decoder.forward(...,
cache=models.kv_cache.init_cache(...))`); there is no separate decoding copy of the layer.

The user-facing API (bucketing, batching, progress, result records, JSONL output) is
`distillm2_jax.generation`; see docs/generation.md.
"""
from distillm2_jax.sampling.decode import (
    GREEDY,
    BatchOutput,
    DecodeState,
    SamplingConfig,
    decode,
    empty_state,
    generate_batch,
    insert,
    next_token,
    row_keys_from_ids,
    sample_logits,
    stop_id_array,
)
from distillm2_jax.sampling.speculative import SpeculativeStats
from distillm2_jax.sampling.filters import (
    apply_temperature,
    categorical,
    filter_logits,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GREEDY", "BatchOutput", "DecodeState", "SamplingConfig", "SpeculativeStats", "apply_temperature", "categorical",
    "decode", "empty_state", "filter_logits", "generate_batch", "insert", "next_token",
    "row_keys_from_ids", "sample_logits", "stop_id_array", "top_k_filter", "top_p_filter",
]
