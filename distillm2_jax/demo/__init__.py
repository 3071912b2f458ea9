"""The embedded default: a procedural task, its tokenizer, a packaged teacher and `distillm2 demo`."""
