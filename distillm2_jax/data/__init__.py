"""Data: prompt sources, chat templating, response pairs, tokenised batches and loaders.

Modules (one job each; see docs/data.md): records (raw records from JSONL/JSON/parquet/HF
saved datasets/TFDS), messages (chat messages, prompt keys), sources (prompt records), chat
(templating, encoding, truncation, end-of-turn), prompts (templated prompts for generation),
generations (generation output format), pairs (teacher/student pairing), tokenized (one
pair's truncated token ids), batches (tokenised [chosen; rejected] batches), loader (grain
loader), tfds_io (array_record without TensorFlow), tokenizer (loading a tokenizer folder).
Import the submodules directly; this package imports nothing heavy. JSON file reading lives
in `distillm2_jax.jsonio`, shared with models/ and hf/.

Layering (each module imports only modules listed before it): tokenizer, tokenized, tfds_io,
records, messages, chat, sources, prompts, generations, pairs, batches, loader, eval_records.
"""
