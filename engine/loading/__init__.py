"""Readers that turn checkpoint files (Hugging Face folders, GGUF files) into configs and state dicts."""
