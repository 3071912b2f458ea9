"""Hugging Face checkpoint import (safetensors -> sharded params) and export (params -> HF folder)."""
