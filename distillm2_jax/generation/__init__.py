"""Generate responses with the JAX sampler: the Python API and the engine of `distillm2 generate`.

    from distillm2_jax import generation
    results = generation.sample(model, prompt_ids, max_new_tokens=1024, temperature=0.8,
                                top_p=0.95, eos_ids=[eos], seed=42, batch_size=16)
    summary = generation.generate_file(model, "prompts.jsonl", "out.jsonl", tokenizer=tok, ...)

Modules (one job each): sampler (token-id prompts -> results in source order), slots
(continuous batching: which row goes into which decoding slot, and when), writer (the
restartable JSONL file and its sidecar), driver (`generate_file`: prompts -> sampler -> writer).
See docs/generation.md.
"""
from distillm2_jax.generation.driver import GenerateSummary, generate_file, response_ids
from distillm2_jax.generation.sampler import (
    FINISH_LENGTH,
    FINISH_STOP,
    Result,
    bucket_length,
    iter_sample,
    model_parts,
    row_seed,
    rows_per_batch,
    sample,
)
from distillm2_jax.generation.writer import META_FORMAT, GenerationWriter, meta_path, model_files_digest

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP", "GenerateSummary", "GenerationWriter", "META_FORMAT", "Result",
    "bucket_length", "generate_file", "iter_sample", "meta_path", "model_files_digest", "model_parts",
    "response_ids", "row_seed", "rows_per_batch", "sample",
]
