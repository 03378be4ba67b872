"""Weights from files: Hugging Face safetensors folders, GGUF (read, tokenizer, conversion),
the seeded demo vision tower, and weight-only quantization of what was loaded."""
